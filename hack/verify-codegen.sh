#!/usr/bin/env bash
# Fails when the generated code under plugins/apis is not what
# hack/update-codegen.sh makes of the current sources. It regenerates into a
# temporary copy of the module, so the work tree is never touched.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "${CAPSTAN_ROOT}"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/capstan-codegen.XXXXXX")"
trap 'rm -rf "${tmp}"' EXIT

# The module's sources as they are in the work tree, committed or not
# (files deleted but not yet committed are left out).
while IFS= read -r -d '' f; do
  [[ -e "${f}" ]] && cp --parents -- "${f}" "${tmp}/"
done < <(git ls-files -z --cached --others --exclude-standard)

hack/update-codegen.sh "${tmp}"

if ! diff -ru plugins/apis "${tmp}/plugins/apis"; then
  die "generated code under plugins/apis is out of date: run hack/update-codegen.sh"
fi
log "generated code under plugins/apis is up to date"
