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
for file in "${files[@]}"; do
  pkg="./$(dirname "${file}")"
  while read -r target; do
    log "fuzzing ${pkg} ${target} for ${fuzztime}"
    go test -run '^$' -fuzz "^${target}\$" -fuzztime "${fuzztime}" "${pkg}"
  done < <(grep -oE '^func Fuzz[A-Za-z0-9_]+' "${file}" | cut -d' ' -f2)
done
