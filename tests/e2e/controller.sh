#!/usr/bin/env bash
# manifests/components/controller on the kit's cluster (tests/e2e/controller/):
# two replicas, one holds the provisioner's Lease and acts, the other waits;
# deleting the leader hands the Lease to the other. Run by run.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/e2e/lib.sh
denied_before=$(denials)
lease=rcsi-provisioner-local-rcsi-io

kubectl apply -k tests/e2e/controller >/dev/null
kubectl -n rcsi-system rollout status deploy/rcsi-controller --timeout=180s >/dev/null
holder() { kubectl -n rcsi-system get lease "$lease" -o jsonpath='{.spec.holderIdentity}' 2>/dev/null; }
pods() { kubectl -n rcsi-system get pod -l app.kubernetes.io/name=rcsi-controller -o jsonpath='{.items[*].metadata.name}'; }
leaders() {
  for p in $(pods); do
    kubectl -n rcsi-system logs "$p" -c provisioner | grep -c '"became leader"' || true
  done | paste -sd+ | bc
}
wait_for 60 "no replica took the lease" sh -c "[ -n \"\$(kubectl -n rcsi-system get lease $lease -o jsonpath='{.spec.holderIdentity}' 2>/dev/null)\" ]"
first=$(holder)
echo " $(pods) " | grep -q " $first " || fail "lease holder $first is not a replica: $(pods)"
sleep 3
[ "$(leaders)" -eq 1 ] || fail "$(leaders) replicas say they lead"
ok "controller: two replicas, one leader ($first)"

t=$(now)
kubectl -n rcsi-system delete pod "$first" --wait=false >/dev/null
wait_for 90 "the lease never moved from $first" sh -c "h=\$(kubectl -n rcsi-system get lease $lease -o jsonpath='{.spec.holderIdentity}'); [ -n \"\$h\" ] && [ \"\$h\" != $first ]"
second=$(holder)
figure "controller: leader $first deleted, $second took the lease in $(since "$t") s"
echo " $(pods) " | grep -q " $second " || fail "new holder $second is not a running replica"
d=$(($(denials) - denied_before))
[ "$d" -eq 0 ] || fail "controller: $d API requests of rcsi-system service accounts were denied (403)"
ok "controller: leader election hands over; no 403"
kubectl delete -k tests/e2e/controller --wait=true >/dev/null
echo "e2e: components/controller passed"
