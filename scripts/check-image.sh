#!/usr/bin/env bash
# Build the authsvc image with buildah (no Docker engine needed) and prove it works: the server
# starts as a non-root user with data on /data, reports SERVING to `authsvc health` (the image's
# HEALTHCHECK), answers /readyz and the JWKS on the HTTP port, and exits 0 on SIGTERM.
#
#   scripts/check-image.sh BASE_IMAGE        e.g. localhost/pyslim:bookworm
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=${1:?usage: scripts/check-image.sh BASE_IMAGE}
TAG=${IMAGE_TAG:-localhost/authsvc:check}
# chroot isolation shares the host's network: pick ports unlikely to be taken.
GRPC_PORT=${CHECK_GRPC_PORT:-55051}
HTTP_PORT=${CHECK_HTTP_PORT:-58080}
BUILDAH=(buildah --storage-driver vfs)

echo "== build $TAG from $BASE_IMAGE"
# Docker image format: the OCI format has no HEALTHCHECK.
"${BUILDAH[@]}" bud --isolation chroot --format docker --layers=false --build-arg "BASE_IMAGE=$BASE_IMAGE" \
  -t "$TAG" -f Dockerfile .

echo "== image config"
"${BUILDAH[@]}" inspect --type image --format \
  'user={{.OCIv1.Config.User}} ports={{.OCIv1.Config.ExposedPorts}} volumes={{.OCIv1.Config.Volumes}} healthcheck={{.Docker.Config.Healthcheck.Test}}' \
  "$TAG"
echo

ctr=$("${BUILDAH[@]}" from "$TAG")
trap '"${BUILDAH[@]}" rm "$ctr" >/dev/null' EXIT

# A throwaway KEK for this check only; it is never printed.
kek=$(python3 -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())')

echo "== run the image's server once and ask its health"
"${BUILDAH[@]}" run --isolation chroot \
  --env "AUTHSVC_KEK=$kek" \
  --env AUTHSVC_ISSUER=https://authsvc.check.invalid \
  --env AUTHSVC_TLS_TERMINATED_UPSTREAM=true \
  --env "AUTHSVC_LISTEN=0.0.0.0:$GRPC_PORT" \
  --env "AUTHSVC_HTTP_LISTEN=127.0.0.1:$HTTP_PORT" \
  "$ctr" -- /bin/sh -c '
    set -e
    echo "user: $(id -u):$(id -g)"
    if touch /opt/authsvc/probe 2>/dev/null; then echo "FAIL: /opt is writable"; exit 1; fi
    authsvc serve > /tmp/serve.log 2>&1 &
    pid=$!
    ok=
    for _ in $(seq 1 60); do
      if authsvc health --timeout 1 > /dev/null 2>&1; then ok=1; break; fi
      sleep 0.5
    done
    if [ -z "$ok" ]; then echo "FAIL: server never SERVING"; cat /tmp/serve.log; exit 1; fi
    echo "health: $(authsvc health)"
    python - "'"$HTTP_PORT"'" <<PY
import json, sys, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
ready = json.load(urllib.request.urlopen(base + "/readyz", timeout=5))
print("readyz:", ready["ready"])
with urllib.request.urlopen(base + "/.well-known/jwks.json", timeout=5) as r:
    print("jwks keys:", len(json.load(r)["keys"]), "cache-control:", r.headers["Cache-Control"])
metrics = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
print("metrics:", sum(1 for l in metrics.splitlines() if l.startswith("authsvc_")), "authsvc_ samples")
PY
    echo "data: $(ls /data | tr "\n" " ")"
    kill -TERM $pid
    wait $pid && code=0 || code=$?
    echo "serve exit: $code"
    echo "first log line: $(head -n1 /tmp/serve.log)"
    test "$code" = 0
  '
echo "== image OK: $TAG"
