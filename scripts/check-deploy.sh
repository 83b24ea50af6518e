#!/usr/bin/env bash
# Check deploy/: the Kubernetes manifests against the Kubernetes API schemas (kubernetes-validate),
# a security scan of them and of the Dockerfile (checkov; any finding fails unless waived with a
# reason in deploy/checkov-waivers.txt), and the Prometheus alert rules (promtool check rules,
# then the rules' unit tests with promtool test rules).
#
#   scripts/check-deploy.sh      `make deploy-check` installs the Python tools into .venv/deploy
#
# promtool comes from Debian's prometheus package; without it the rule checks are skipped with a
# message, except in CI (CI set), where that is an error.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS=${DEPLOY_TOOLS:-.venv/deploy/bin}
for tool in kubernetes-validate checkov; do
  if [ ! -x "$TOOLS/$tool" ]; then
    echo "$TOOLS/$tool not found: run 'make deploy-check'" >&2
    exit 1
  fi
done

echo "== kubernetes-validate deploy/kubernetes"
"$TOOLS/kubernetes-validate" --strict --quiet deploy/kubernetes/*.yaml
echo "all manifests valid"

echo "== checkov deploy/kubernetes and Dockerfile"
waivers=()
while read -r id reason; do
  case "$id" in ''|'#'*) continue ;; esac
  if [ -z "$reason" ]; then
    echo "deploy/checkov-waivers.txt: $id has no reason" >&2
    exit 1
  fi
  waivers+=("$id")
done < deploy/checkov-waivers.txt
skip=$(IFS=,; echo "${waivers[*]}")
# --skip-download: no call to any platform; the checks ship with checkov.
"$TOOLS/checkov" --quiet --compact --skip-download --skip-check "$skip" \
  --framework kubernetes -d deploy/kubernetes
"$TOOLS/checkov" --quiet --compact --skip-download --skip-check "$skip" \
  --framework dockerfile -f Dockerfile

echo "== promtool deploy/prometheus"
if ! command -v promtool >/dev/null; then
  if [ -n "${CI:-}" ]; then
    echo "promtool not found (apt-get install prometheus): required in CI" >&2
    exit 1
  fi
  echo "SKIPPED: promtool not found (apt-get install prometheus); the alert rules are not checked"
  exit 0
fi
(cd deploy/prometheus && promtool check rules alerts.yml && promtool test rules alerts.test.yml)
