# Capstan: see README.md. Every target runs on a fresh clone; the control plane
# is built once into _output/tools/<versions>/ and reused, and so are the
# pinned check tools. `make help` lists the targets.

GO ?= go
SHELL := /usr/bin/env bash
BIN := $(CURDIR)/bin
# Go packages that need no cluster; the e2e suites are under test/e2e/.
UNIT_PKGS = $$($(GO) list ./... | grep -v /test/e2e/)
UNIT_TIMEOUT ?= 20m
E2E_TIMEOUT ?= 30m
FUZZTIME ?= 30s

REGISTRY ?= ghcr.io/capstan-dev
VERSION ?= v0.1.0
IMAGES := router/cmd/capstan-router metricsadapter/cmd/capstan-metrics-adapter plugins/cmd/capstan-scheduler

# staticcheck, one exact release (2026.2.2) that supports Go 1.26, installed once
# into its own versioned folder.
STATICCHECK_VERSION := v0.8.2
STATICCHECK := $(CURDIR)/_output/tools/staticcheck-$(STATICCHECK_VERSION)/staticcheck
# The shell scripts shellcheck checks (it follows what they source).
SHELL_SCRIPTS := $(wildcard hack/*.sh) .ci/run
# The checks make verify runs; each is also a target of its own.
VERIFY_CHECKS := verify-gofmt verify-tidy verify-vet verify-shellcheck verify-codegen verify-staticcheck

.PHONY: all help demo build tools test test-unit test-e2e fuzz verify lint $(VERIFY_CHECKS) \
	update-codegen cluster-up cluster-down clean images bench-router bench-adapter bench-scheduler bench-routing bench-picker

all: build

## help: list the targets and what they do
help:
	@awk '/^## [A-Za-z0-9_-]+:/ { sub(/^## /, ""); n = index($$0, ":"); \
			printf "  %-20s %s\n", substr($$0, 1, n - 1), substr($$0, n + 2); more = 1; next } \
		more && /^## / { sub(/^## /, ""); printf "  %-20s %s\n", "", $$0; next } \
		{ more = 0 }' $(MAKEFILE_LIST)

## demo: Capstan's closed loop on a local cluster, live (DEMO_ARGS=--duration=2m for scripts)
demo:
	hack/demo.sh $(DEMO_ARGS)

## build: the three binaries, the fleet simulator, the local-cluster runner and
## the Inference Extension's lightweight endpoint picker (lwepp, a go.mod tool
## the e2e tests run), into bin/
build:
	$(GO) build -o $(BIN)/ ./plugins/cmd/... ./metricsadapter/cmd/... ./router/cmd/... \
		./test/fleet/cmd/... ./test/cluster/cmd/... ./test/demo/cmd/... \
		sigs.k8s.io/gateway-api-inference-extension/cmd/lwepp

## tools: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok (cached)
tools:
	@hack/build-control-plane.sh >/dev/null

## test: everything CI runs: verify, unit tests, fuzzing, e2e tests
test: verify test-unit fuzz test-e2e

## test-unit: every package but the e2e suites, with the race detector
test-unit:
	$(GO) test -race -count=1 -timeout $(UNIT_TIMEOUT) $(UNIT_PKGS)

## fuzz: every fuzz target in the repository for FUZZTIME each (default 30s)
fuzz:
	FUZZTIME=$(FUZZTIME) hack/fuzz.sh

## test-e2e: the suites under test/e2e, each against its own local cluster in a
## private network namespace (needs root)
test-e2e: build
	CAPSTAN_TOOLS_DIR="$$(hack/build-control-plane.sh)" CAPSTAN_BIN_DIR=$(BIN) \
		$(GO) test -count=1 -timeout $(E2E_TIMEOUT) ./test/e2e/...

## verify: every static check (the verify-* targets); runs them all, then fails
## if any failed
verify:
	@failed=(); \
	for check in $(VERIFY_CHECKS); do \
		echo "--- $$check"; \
		$(MAKE) --no-print-directory "$$check" || failed+=("$$check"); \
	done; \
	if (($${#failed[@]})); then echo "verify failed: $${failed[*]}"; exit 1; fi; \
	echo "verify passed"

## lint: the same as verify
lint: verify

## verify-gofmt: gofmt leaves every Go file as it is
verify-gofmt:
	@out="$$(gofmt -l $$(git ls-files '*.go'))"; \
	if [[ -n "$$out" ]]; then echo "gofmt needed (gofmt -w):"; echo "$$out"; exit 1; fi

## verify-tidy: go mod tidy leaves go.mod and go.sum as they are (both modules)
verify-tidy:
	$(GO) mod tidy -diff
	cd hack/tools/etcd && $(GO) mod tidy -diff

## verify-vet: go vet, here and in hack/tools/etcd (its own module)
verify-vet:
	$(GO) vet ./...
	cd hack/tools/etcd && $(GO) vet ./...

## verify-staticcheck: staticcheck ./... with the pinned version
verify-staticcheck: $(STATICCHECK)
	$(STATICCHECK) ./...

$(STATICCHECK):
	GOBIN=$(@D) $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)

## verify-shellcheck: shellcheck on hack/*.sh and .ci/run (installs it from
## Debian when missing and root)
verify-shellcheck:
	@if ! command -v shellcheck >/dev/null; then \
		if [[ "$$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then \
			echo "installing shellcheck"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck >/dev/null || exit 1; \
		else \
			echo "shellcheck is missing: apt-get install shellcheck"; exit 1; \
		fi; \
	fi
	shellcheck --external-sources --source-path=SCRIPTDIR $(SHELL_SCRIPTS)

## verify-codegen: the generated code under plugins/apis is what update-codegen makes
verify-codegen:
	hack/verify-codegen.sh

## update-codegen: regenerate the deepcopy, defaults and conversion code of plugins/apis
update-codegen:
	hack/update-codegen.sh

## cluster-up: start a local cluster (control plane, kwok nodes, fleet simulator) in
## the network namespace "capstan", in the background
cluster-up:
	hack/cluster-up.sh

## cluster-down: stop the local cluster that cluster-up started
cluster-down:
	hack/cluster-down.sh

## bench-router: capstan-router against nginx and HAProxy (results in _output/bench/)
## bench-adapter: capstan-metrics-adapter against Prometheus + prometheus-adapter
## bench-scheduler: capstan-scheduler's throughput with and without ModelSlots, and
## its Go benchmarks
## bench-routing: every balancer on the simulator's vLLM engine model, four workloads
## (CAPSTAN_BENCH_ROUTING=quick for a short run, =lora for its LoRA part alone; results in
## _output/bench/routing.md and routing-lora.md)
## bench-picker: what asking an InferencePool's endpoint picker (lwepp) adds per
## request, against the router's own balancer (results in _output/bench/endpoint-picker.md)
bench-router bench-adapter bench-scheduler bench-routing bench-picker: build
	hack/$@.sh

## images: one image per binary from the Dockerfile (needs a Docker engine)
images:
	@docker info >/dev/null 2>&1 || { echo "make images needs a running Docker engine (docker info failed); the binaries themselves build with make build"; exit 1; }
	@for cmd in $(IMAGES); do \
		img="$(REGISTRY)/$$(basename $$cmd):$(VERSION)"; \
		echo "building $$img"; \
		docker build --build-arg CMD=$$cmd --build-arg VERSION=$(VERSION) -t "$$img" . || exit 1; \
	done

## clean: stop the local cluster, remove bin/ and _output/ (cached tools too)
clean:
	-hack/cluster-down.sh 2>/dev/null
	rm -rf $(BIN) _output
