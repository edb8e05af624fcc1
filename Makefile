# Capstan: see README.md. Every target runs on a fresh clone; the control plane
# is built once into _output/tools/<versions>/ and reused.

GO ?= go
SHELL := /usr/bin/env bash
BIN := $(CURDIR)/bin
# Go packages that need no cluster; the e2e suites are under test/e2e/.
UNIT_PKGS = $$($(GO) list ./... | grep -v /test/e2e/)
E2E_TIMEOUT ?= 30m

REGISTRY ?= ghcr.io/capstan-dev
VERSION ?= v0.1.0
IMAGES := router/cmd/capstan-router metricsadapter/cmd/capstan-metrics-adapter plugins/cmd/capstan-scheduler

.PHONY: all demo build tools test test-unit test-e2e lint cluster-up cluster-down clean images \
	bench-router bench-adapter bench-scheduler

all: build

## demo: Capstan's closed loop on a local cluster, live (DEMO_ARGS=--duration=2m for scripts)
demo:
	hack/demo.sh $(DEMO_ARGS)

## build: the three binaries, the fleet simulator and the local-cluster runner, into bin/
build:
	$(GO) build -o $(BIN)/ ./plugins/cmd/... ./metricsadapter/cmd/... ./router/cmd/... \
		./test/fleet/cmd/... ./test/cluster/cmd/... ./test/demo/cmd/...

## tools: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok (cached)
tools:
	@hack/build-control-plane.sh >/dev/null

## test: everything CI runs: lint, unit tests, e2e tests
test: lint test-unit test-e2e

test-unit:
	$(GO) test -count=1 $(UNIT_PKGS)

## test-e2e: the suites under test/e2e, each against its own local cluster in a
## private network namespace (needs root)
test-e2e: build
	CAPSTAN_TOOLS_DIR="$$(hack/build-control-plane.sh)" CAPSTAN_BIN_DIR=$(BIN) \
		$(GO) test -count=1 -timeout $(E2E_TIMEOUT) ./test/e2e/...

lint:
	@out="$$(gofmt -l $$(git ls-files '*.go'))"; if [[ -n "$$out" ]]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	cd hack/tools/etcd && $(GO) vet ./...

cluster-up:
	hack/cluster-up.sh

cluster-down:
	hack/cluster-down.sh

bench-router bench-adapter bench-scheduler: build
	hack/$@.sh

## images: one image per binary from the Dockerfile (needs a Docker engine)
images:
	@docker info >/dev/null 2>&1 || { echo "make images needs a running Docker engine (docker info failed); the binaries themselves build with make build"; exit 1; }
	@for cmd in $(IMAGES); do \
		img="$(REGISTRY)/$$(basename $$cmd):$(VERSION)"; \
		echo "building $$img"; \
		docker build --build-arg CMD=$$cmd --build-arg VERSION=$(VERSION) -t "$$img" . || exit 1; \
	done

clean:
	-hack/cluster-down.sh 2>/dev/null
	rm -rf $(BIN) _output
