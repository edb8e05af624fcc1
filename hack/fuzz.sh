#!/usr/bin/env bash
# Runs every fuzz target in the repository (each func Fuzz* in a _test.go
# file) for FUZZTIME each, one after the other, and fails on the first crash;
# go test writes the input that crashed under the package's testdata/fuzz/.
#
# usage: hack/fuzz.sh                 (make fuzz)
#   FUZZTIME=30s                      per target
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "${CAPSTAN_ROOT}"

fuzztime="${FUZZTIME:-30s}"
mapfile -t files < <(git grep -l -E '^func Fuzz[A-Za-z0-9_]+\(' -- '*_test.go')
((${#files[@]})) || die "no fuzz targets found"
out="$(mktemp)"
trap 'rm -f "${out}"' EXIT
for file in "${files[@]}"; do
  pkg="./$(dirname "${file}")"
  while read -r target; do
    log "fuzzing ${pkg} ${target} for ${fuzztime}"
    if ! go test -run '^$' -fuzz "^${target}\$" -fuzztime "${fuzztime}" "${pkg}" 2>&1 | tee "${out}"; then
      # Go 1.26's fuzzing coordinator can report its own -fuzztime
      # deadline as a failure when a worker is still busy at that moment
      # (golang.org/issue/75804, fixed in Go 1.27): the run ended on time,
      # with no input found. Anything else, and any input written, fails.
      if grep -q 'Failing input written to' "${out}" || ! grep -qx '    context deadline exceeded' "${out}"; then
        die "${pkg} ${target} failed"
      fi
      log "${pkg} ${target}: the fuzzing deadline reported as a failure, no input found (golang.org/issue/75804); not a failure"
    fi
  done < <(grep -oE '^func Fuzz[A-Za-z0-9_]+' "${file}" | cut -d' ' -f2)
done
