#!/usr/bin/env bash
# `rbench k8s` on the kit's cluster with overlays/local-path installed (its
# quirks from tests/e2e/local-path/): two StorageClasses side by side
# (directories and ext4 image files), three claims and pods each, the
# workload on all pods at once through the API server's port-forward, with
# a kubeconfig holding only a ServiceAccount token bound to the minimal
# RBAC of manifests/rbench (no request denied). Checks the provisioning
# table (every volume bound, running, answering and deleted), per-pod and
# aggregate results in the JSON, and that nothing is left: no claim, PV,
# pod, Secret or volume data. Then a run in a namespace of its own (gone
# afterwards), and one against a StorageClass that does not exist, refused
# before anything is made. Run by run.sh (the image holds rbench).
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/e2e/lib.sh
rbench=${RBENCH:-target/release/rbench}
kubectl apply -k tests/e2e/local-path >/dev/null
kubectl -n rcsi-system rollout status ds/rcsi-node --timeout=120s >/dev/null
wait_for 60 "local.rcsi.io never registered" \
  sh -c "kubectl get csinode -o jsonpath='{.items[*].spec.drivers[*].name}' | grep -qw local.rcsi.io"
out=$(mktemp -d)
cleanup() {
  kubectl delete ns -l app.kubernetes.io/name=rbench --wait=false >/dev/null 2>&1 || true
  kubectl delete clusterrolebinding rbench --wait=false >/dev/null 2>&1 || true
  kubectl delete -k manifests/rbench --wait=false >/dev/null 2>&1 || true
  kubectl delete -k tests/e2e/local-path --wait=true >/dev/null 2>&1 || true
  rm -rf "$out"
}
trap cleanup EXIT
# Namespaces rbench made for itself (not the one of manifests/rbench).
own_namespaces() { kubectl get ns --no-headers 2>/dev/null | awk '$1 ~ /^rbench-/ && $1 != "rbench-bench"'; }

# The README's minimal RBAC, bound to a ServiceAccount whose token is all
# the kubeconfig rbench gets: what it needs and no more.
kubectl apply -k manifests/rbench >/dev/null
kubectl -n rbench-bench create serviceaccount rbench >/dev/null
kubectl create clusterrolebinding rbench --clusterrole=rbench --serviceaccount=rbench-bench:rbench >/dev/null
kubectl -n rbench-bench create rolebinding rbench --role=rbench --serviceaccount=rbench-bench:rbench >/dev/null
server=$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')
ca=$(kubectl config view --raw --minify --flatten -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')
token=$(kubectl -n rbench-bench create token rbench)
cat > "$out/kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters: [{name: e2e, cluster: {server: "$server", certificate-authority-data: "$ca"}}]
users: [{name: rbench, user: {token: "$token"}}]
contexts: [{name: e2e, context: {cluster: e2e, user: rbench, namespace: rbench-bench}}]
current-context: e2e
KUBECONFIG
sa_denials() { grep '"code":403' "$WORKDIR/logs/audit.log" 2>/dev/null | grep -c 'system:serviceaccount:rbench-bench:rbench' || true; }

t=$(now)
KUBECONFIG=$out/kubeconfig "$rbench" k8s --namespace rbench-bench \
  --storageclass rcsi-local,rcsi-local-file --pvcs 3 --size 256Mi \
  --image example.test/rcsi:e2e --node-spread --timeout 120 --json "$out/r.json" \
  -- -w -r --stat -t 2 -n 2 -N 8 -s 1m -b 256k > "$out/stdout" 2> "$out/stderr" ||
  fail "rbench k8s failed: $(tail -5 "$out/stderr") $(tail -5 "$out/stdout")"
figure "rbench: two StorageClasses x 3 volumes measured in $(since "$t") s"
sed 's/^/  /' "$out/stdout"
python3 - "$out/r.json" <<'PY' || fail "the JSON report is not what was measured"
import json, sys
doc = json.load(open(sys.argv[1]))
classes = doc["storageclasses"]
assert [c["storage_class"] for c in classes] == ["rcsi-local", "rcsi-local-file"], classes
for c in classes:
    assert len(c["volumes"]) == 3, c["volumes"]
    for v in c["volumes"]:
        for k in ("bound_s", "running_s", "answering_s", "deleted_s"):
            assert v[k] is not None and v[k] >= 0, (k, v)
        assert v["bound_s"] <= v["running_s"] <= v["answering_s"], v
    phases = [r["phase"] for r in c["results"]]
    assert phases == ["WRITE", "STAT", "READ"], phases
    for r in c["results"]:
        assert len(r["hosts"]) == 3, r["hosts"]
        if r["phase"] in ("WRITE", "READ"):
            # 3 pods x 2 threads x 2 dirs x 8 files x 1 MiB.
            assert r["last"]["bytes"] == 3 * 2 * 2 * 8 * (1 << 20), r["last"]
        print(f'e2e: figure: rbench: {c["storage_class"]} {r["phase"]}: {r["last"]["mib_per_s"]:.1f} MiB/s, '
              f'{r["last"]["entries_per_s"]:.0f} entries/s, p99 {r["latency"]["p99_us"]:.0f} us')
    b = sorted(v["bound_s"] for v in c["volumes"])
    a = sorted(v["answering_s"] for v in c["volumes"])
    d = sorted(v["deleted_s"] for v in c["volumes"])
    print(f'e2e: figure: rbench: {c["storage_class"]}: bound p50 {b[1]:.1f} s, answering p50 {a[1]:.1f} s '
          f'max {a[2]:.1f} s, PV gone p50 {d[1]:.1f} s')
PY
grep -q "^storageclass " "$out/stdout" || fail "no side-by-side table"
grep -q "^provisioning (rcsi-local-file)" "$out/stdout" || fail "no provisioning table"
left=$(kubectl -n rbench-bench get pvc,pod,secret -l rbench.rcsi.io/run --no-headers 2>/dev/null)
[ -z "$left" ] || fail "left in rbench-bench: $left"
wait_for 60 "PVs left" sh -c '[ -z "$(kubectl get pv --no-headers 2>/dev/null)" ]'
[ -z "$(volume_data)" ] || fail "volume data left: $(volume_data)"
[ "$(sa_denials)" = 0 ] || fail "the minimal Role lacks something: $(sa_denials) requests of the rbench ServiceAccount denied"
ok "rbench k8s: two StorageClasses side by side with the minimal RBAC, nothing left"

# Without --namespace (the admin's kubeconfig): a namespace of its own, gone afterwards.
t=$(now)
"$rbench" k8s --storageclass rcsi-local --image example.test/rcsi:e2e --size 64Mi \
  -- -w -t 1 -s 8m -b 1m > "$out/stdout" 2> "$out/stderr" ||
  fail "rbench k8s in its own namespace failed: $(tail -5 "$out/stderr")"
figure "rbench: one volume in a namespace of its own in $(since "$t") s"
wait_for 60 "rbench's own namespace left: $(own_namespaces)" sh -c "[ -z \"\$(kubectl get ns --no-headers | awk '\$1 ~ /^rbench-/ && \$1 != \"rbench-bench\"')\" ]"
ok "rbench k8s: its own namespace made and removed"

if "$rbench" k8s --storageclass nope -- -w -s 1m > "$out/stdout" 2> "$out/stderr"; then
  fail "rbench k8s ran against a missing StorageClass"
fi
grep -q 'StorageClass "nope" does not exist (there are: .*rcsi-local' "$out/stderr" ||
  fail "unclear error for a missing StorageClass: $(cat "$out/stderr")"
[ -z "$(own_namespaces)" ] || fail "a refused run made a namespace: $(own_namespaces)"
ok "rbench k8s: a missing StorageClass refused before anything is made"
ok "rbench"
