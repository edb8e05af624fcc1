#!/usr/bin/env bash
# Benchmarks capstan-metrics-adapter on a local cluster (in the private
# network namespace hack/netns.sh makes) and, when they can be installed,
# Prometheus + prometheus-adapter at their default settings on the same pods.
# Prints a results table; writes it to _output/bench/adapter.md too.
#
# usage: hack/bench-adapter.sh            (make bench-adapter builds first)
#   CAPSTAN_BENCH_PODS=2000      simulated vLLM pods, scraped every second
#   CAPSTAN_BENCH_STEADY=30s     span of the CPU measurement
#   CAPSTAN_BENCH_PEERS=0        skip Prometheus + prometheus-adapter
#   CAPSTAN_BENCH_TIMEOUT=40m    bound on the whole run
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$(pwd)"
out="${root}/_output/bench"
mkdir -p "${out}"

tools="$(hack/build-control-plane.sh)"
if [[ ! -x bin/capstan-metrics-adapter ]]; then
  go build -o bin/ ./metricsadapter/cmd/...
fi

peer_reason=""
prometheus=""
prometheus_adapter=""
if [[ "${CAPSTAN_BENCH_PEERS:-1}" != 0 ]]; then
  # Prometheus from Debian.
  if ! command -v prometheus >/dev/null; then
    echo "installing Prometheus (Debian package prometheus)..." >&2
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; } >&2; then
      peer_reason="apt-get could not install the Debian package prometheus"
    fi
  fi
  prometheus="$(command -v prometheus || true)"
  # prometheus-adapter from the Go module proxy. "go install ...@v0.12.0"
  # fails (the proxy refuses the module's version list, which go install
  # reads for deprecations), so the module is downloaded and built from its
  # own go.mod.
  pa_version=v0.12.0
  prometheus_adapter="${root}/_output/tools/prometheus-adapter-${pa_version}/prometheus-adapter"
  if [[ -z "${peer_reason}" && ! -x "${prometheus_adapter}" ]]; then
    echo "building prometheus-adapter ${pa_version} (once; a few minutes)..." >&2
    if moddir="$(cd "${TMPDIR:-/tmp}" && GOFLAGS=-mod=mod go mod download -json "sigs.k8s.io/prometheus-adapter@${pa_version}" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')" &&
      [[ -n "${moddir}" ]] &&
      (cd "${moddir}" && GOFLAGS=-mod=mod go build -o "${prometheus_adapter}" ./cmd/adapter) >&2; then
      :
    else
      peer_reason="sigs.k8s.io/prometheus-adapter@${pa_version} could not be downloaded or built from the Go module proxy"
      prometheus_adapter=""
    fi
  fi
  if [[ -z "${prometheus}" ]]; then
    peer_reason="${peer_reason:-no prometheus binary}"
  fi
  if [[ -n "${peer_reason}" ]]; then
    prometheus="" prometheus_adapter=""
    echo "not measuring Prometheus + prometheus-adapter: ${peer_reason}" >&2
  fi
else
  peer_reason="CAPSTAN_BENCH_PEERS=0"
fi

# Compile outside the namespace (no module downloads inside); the test binary
# re-runs itself in hack/netns.sh and starts the cluster there.
go test -c -o "${out}/bench-adapter.test" ./test/e2e/adapter/
CAPSTAN_TOOLS_DIR="${tools}" CAPSTAN_BIN_DIR="${root}/bin" \
  CAPSTAN_BENCH_ADAPTER=1 CAPSTAN_BENCH_OUT="${out}/adapter.md" \
  CAPSTAN_PROMETHEUS="${prometheus}" CAPSTAN_PROMETHEUS_ADAPTER="${prometheus_adapter}" CAPSTAN_PEER_SKIPPED="${peer_reason}" \
  timeout "${CAPSTAN_BENCH_TIMEOUT:-40m}" \
  "${out}/bench-adapter.test" -test.run '^TestBenchmarkAdapter$' -test.v -test.timeout "${CAPSTAN_BENCH_TIMEOUT:-40m}" \
  | awk '!/^    / || /^    [a-z_]+_test\.go:/' >&2
echo
echo "capstan-metrics-adapter benchmark ($(date -u '+%Y-%m-%d'), $(nproc) CPUs, $(uname -m)):"
cat "${out}/adapter.md"
