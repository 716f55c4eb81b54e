#!/usr/bin/env bash
# End-to-end on a real Kubernetes for users with Docker: a kind cluster, the three images built from this
# checkout (CPU variants), the Helm chart, the laptop demo's objects (examples/local: the tiny offline model,
# SFT then GRPO, a CPU-engine Deployment), then a chat completion through the served adapter.
#
#   scripts/e2e-kind.sh                 # needs docker, kind, kubectl, helm, curl
#   KEEP_CLUSTER=1 scripts/e2e-kind.sh  # leave the cluster up afterwards (kind delete cluster --name perennial-e2e)
#   SKIP_BUILD=1 scripts/e2e-kind.sh    # reuse images built before (the tags below)
#
# Each step is something the test suite already does on the embedded control plane (named in its comment); this
# script only swaps the embedded control plane for a real one. The CPU images are built for the machine's own
# architecture (amd64 or arm64). Expect ~20 minutes on a laptop, most of it building the images.
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${CLUSTER:-perennial-e2e}
NAMESPACE=${NAMESPACE:-perennial}
OPERATOR_IMAGE=${OPERATOR_IMAGE:-perennial-operator:e2e}
TRAINER_IMAGE=${TRAINER_IMAGE:-perennial-trainer:e2e-cpu}
SERVER_IMAGE=${SERVER_IMAGE:-perennial-server:e2e-cpu}
TIMEOUT=${TIMEOUT:-1800}
CPU_INDEX=https://download.pytorch.org/whl/cpu

log() { printf '\n==> %s\n' "$*"; }
die() { printf 'e2e-kind: %s\n' "$*" >&2; exit 1; }

for tool in docker kind kubectl helm curl; do
  command -v "$tool" >/dev/null 2>&1 || die "needs '$tool' on PATH"
done
docker info >/dev/null 2>&1 || die "cannot reach the Docker daemon"

cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    printf '\ne2e-kind: failed (exit %s); the state of the namespace:\n' "$rc" >&2
    kubectl -n "$NAMESPACE" get perennial,jobs,pods,pvc -o wide >&2 || true
    kubectl -n "$NAMESPACE" logs deployment/perennial --tail=50 >&2 || true
  fi
  [ -n "${PF_PID:-}" ] && kill "$PF_PID" 2>/dev/null
  if [ "${KEEP_CLUSTER:-0}" != 1 ]; then
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

# Wait until `kubectl get <what>` finds the object (kubectl wait fails on an object that does not exist yet).
wait_exists() {
  local what=$1 deadline=$((SECONDS + TIMEOUT))
  until kubectl -n "$NAMESPACE" get "$what" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || die "timed out waiting for $what to exist"
    sleep 5
  done
}

# 1. Images: the operator, and the CPU variants of the trainer and server images (release.yml builds the same
#    with the same build arguments). Their Python code is what the suite runs (tests/unit, tests/integration).
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  log "Building $OPERATOR_IMAGE, $TRAINER_IMAGE, $SERVER_IMAGE"
  docker build -f operator/Dockerfile -t "$OPERATOR_IMAGE" .
  docker build -f trainer_image/Dockerfile -t "$TRAINER_IMAGE" \
    --build-arg BASE_IMAGE=python:3.11-slim --build-arg PERENNIAL_EXTRA=trainer --build-arg PIP_EXTRA_INDEX_URL="$CPU_INDEX" .
  docker build -f server_image/Dockerfile -t "$SERVER_IMAGE" \
    --build-arg BASE_IMAGE=python:3.11-slim --build-arg PERENNIAL_EXTRA=server --build-arg PIP_EXTRA_INDEX_URL="$CPU_INDEX" .
fi

# 2. A one-node cluster (every ReadWriteOnce claim below is then usable by every pod), the images loaded into it.
log "Creating kind cluster $CLUSTER"
if ! kind get clusters | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --wait 180s
fi
kubectl config use-context "kind-$CLUSTER" >/dev/null
kind load docker-image --name "$CLUSTER" "$OPERATOR_IMAGE" "$TRAINER_IMAGE" "$SERVER_IMAGE"

# 3. The volumes of examples/local/00-volumes.yaml, ReadWriteOnce (kind's local-path provisioner has no
#    ReadWriteMany), plus the chart's default artifact and feedback claims. Made before the operator starts: it
#    mounts perennial-artifacts to check adapters' artifacts (storage.mountClaims).
log "Namespace $NAMESPACE and its volumes"
kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply -f -
for claim in models data feedback perennial-artifacts perennial-feedback; do
  cat <<EOF
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $claim, namespace: $NAMESPACE}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
EOF
done | kubectl apply -f -

# 4. The chart, watching this namespace only, with the images just loaded (never pulled). On the embedded control
#    plane: the operator with the same settings (tests/harness.py running_cluster; the chart's rendering and RBAC
#    in tests/unit/test_chart*.py).
log "Installing the chart"
helm upgrade --install perennial charts/perennial --namespace "$NAMESPACE" --wait --timeout 5m \
  --set image.repository="${OPERATOR_IMAGE%:*}" --set image.tag="${OPERATOR_IMAGE##*:}" --set image.pullPolicy=Never \
  --set images.trainer="$TRAINER_IMAGE" --set images.server="$SERVER_IMAGE" \
  --set "watch.namespaces={$NAMESPACE}" --set "storage.mountClaims={perennial-artifacts}"
helm test perennial --namespace "$NAMESPACE" --timeout 5m

# 5. The demo's tiny offline model and toy data, written into the claims by the trainer image: the same
#    perennial_trainer.demo.prepare that `perennial dev --demo` runs (tests/e2e/test_perennial_dev.py).
log "Preparing the tiny model and data"
kubectl -n "$NAMESPACE" delete job perennial-demo-data --ignore-not-found
kubectl -n "$NAMESPACE" apply -f - <<EOF
apiVersion: batch/v1
kind: Job
metadata: {name: perennial-demo-data}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      automountServiceAccountToken: false
      securityContext: {runAsNonRoot: true, runAsUser: 1000, fsGroup: 1000, seccompProfile: {type: RuntimeDefault}}
      containers:
        - name: prepare
          image: $TRAINER_IMAGE
          imagePullPolicy: Never
          command: [python, -c, "from perennial_trainer.demo import prepare; prepare('/mnt/pvc')"]
          securityContext: {allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}
          volumeMounts:
            - {name: models, mountPath: /mnt/pvc/models}
            - {name: data, mountPath: /mnt/pvc/data}
      volumes:
        - {name: models, persistentVolumeClaim: {claimName: models}}
        - {name: data, persistentVolumeClaim: {claimName: data}}
EOF
kubectl -n "$NAMESPACE" wait --for=condition=Complete job/perennial-demo-data --timeout=10m

# 6. The demo's objects (BaseModel tiny, RewardSpec fruit-colours, TrainingRuns fruit-sft then fruit-grpo, the
#    CPU-engine Deployment fruit-chat): `perennial dev --demo --apply examples/local` applies the same files
#    (tests/e2e/test_perennial_dev.py); the RewardSpec's validation Job as in
#    tests/integration/test_rewardspec_validation.py.
log "Applying examples/local"
kubectl -n "$NAMESPACE" apply -f examples/local/01-basemodel.yaml -f examples/local/02-rewardspec.yaml \
  -f examples/local/03-trainingrun-sft.yaml -f examples/local/04-trainingrun-grpo.yaml -f examples/local/05-deployment.yaml
kubectl -n "$NAMESPACE" wait --for=condition=Ready basemodels.perennial.ai/tiny --timeout=5m
kubectl -n "$NAMESPACE" wait --for=condition=Validated rewardspecs.perennial.ai/fruit-colours --timeout=10m

# 7. Training makes an Adapter (tests/e2e/test_operator_trains_locally.py: the trainer Job, its progress, the
#    Adapter with its lineage; tests/integration/test_trainingrun.py on the embedded control plane).
log "Waiting for the SFT run and its Adapter fruit-v1"
kubectl -n "$NAMESPACE" wait --for=condition=Succeeded trainingruns.perennial.ai/fruit-sft --timeout="${TIMEOUT}s"
wait_exists adapters.perennial.ai/fruit-v1
kubectl -n "$NAMESPACE" wait --for=condition=Ready adapters.perennial.ai/fruit-v1 --timeout=5m

# 8. The Deployment serves once its first rollout passed the smoke test (tests/integration/
#    test_deployment_controller.py: first rollout, smoke test, switch; tests/e2e/test_dev_serving.py serves the
#    same objects with real pods as processes).
log "Waiting for Deployment fruit-chat to serve"
kubectl -n "$NAMESPACE" wait --for=condition=Ready deployments.perennial.ai/fruit-chat --timeout="${TIMEOUT}s"
kubectl -n "$NAMESPACE" get perennial

# 9. A chat completion by served name through the Service (tests/e2e/test_perennial_dev.py asks the same question).
log "Calling fruit-chat"
kubectl -n "$NAMESPACE" port-forward service/fruit-chat 18080:80 >/dev/null 2>&1 &
PF_PID=$!
deadline=$((SECONDS + 60))
until curl -fsS -o /dev/null http://127.0.0.1:18080/v1/models 2>/dev/null; do
  [ "$SECONDS" -lt "$deadline" ] || die "port-forward to service/fruit-chat did not answer"
  sleep 1
done
answer=$(curl -fsS http://127.0.0.1:18080/v1/chat/completions -H 'Content-Type: application/json' \
  -d '{"model": "fruit-sft", "messages": [{"role": "user", "content": "What colour is a banana?"}], "max_tokens": 8}')
printf '%s\n' "$answer"
case $answer in
  *'"choices"'*'"content"'*) log "OK: Perennial trained an adapter and served it on kind" ;;
  *) die "unexpected answer from fruit-chat" ;;
esac
