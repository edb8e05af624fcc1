#!/usr/bin/env bash
# Regenerates the deepcopy, defaults and conversion functions of the scheduler
# plugins' args types (the zz_generated.*.go files of plugins/apis/config and
# plugins/apis/config/v1) with k8s.io/code-generator, headed by
# plugins/apis/boilerplate.go.txt.
#
# The generator commands are the packages' //go:generate lines, which pin the
# code-generator version (go run k8s.io/code-generator/cmd/<gen>@<version>).
# This script first checks that every pin is the k8s.io staging version go.mod
# uses (k8s.io/apimachinery's), so the generated code matches the libraries it
# is compiled against, then runs them.
#
# Usage: hack/update-codegen.sh [module root]
# The root defaults to this repository; hack/verify-codegen.sh passes a copy.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

root="${1:-${CAPSTAN_ROOT}}"
cd "${root}"

want="$(go list -m -f '{{with .Replace}}{{.Version}}{{else}}{{.Version}}{{end}}' k8s.io/apimachinery)"
[[ -n "${want}" ]] || die "cannot read k8s.io/apimachinery's version from go.mod"

pins="$(grep -rhoE --include='*.go' '^//go:generate go run k8s\.io/code-generator/cmd/[a-z-]+@[^ ]+' plugins/apis |
  sed 's/^.*cmd\///' | sort -u)"
[[ -n "${pins}" ]] || die "no //go:generate line under plugins/apis runs k8s.io/code-generator"
bad=0
while read -r pin; do
  if [[ "${pin#*@}" != "${want}" ]]; then
    printf 'error: //go:generate runs %s, but go.mod uses k8s.io staging %s\n' "${pin}" "${want}" >&2
    bad=1
  fi
done <<<"${pins}"
((bad == 0)) || die "pin k8s.io/code-generator at ${want} in the //go:generate lines under plugins/apis"

log "generating plugins/apis with k8s.io/code-generator@${want} ($(cut -d@ -f1 <<<"${pins}" | paste -sd ' '))"
go generate ./plugins/apis/...
