#!/usr/bin/env bash
# Proto hygiene: `buf lint` on protos/, then `buf breaking` of protos/ against a git ref.
#
#   scripts/proto-lint.sh [REF]     REF defaults to HEAD (the working tree against the last
#                                   commit); CI passes HEAD~1 (the new commit against the one
#                                   before it on main).
# BUF names the buf binary (default: the one `make lint` installs under .venv/buf).
set -euo pipefail
cd "$(dirname "$0")/.."

REF=${1:-HEAD}
BUF=${BUF:-.venv/buf/node_modules/.bin/buf}
if [ ! -x "$BUF" ]; then
  if command -v buf >/dev/null; then BUF=buf; else
    echo "buf not installed (npm package @bufbuild/buf): skipping proto lint" >&2
    exit 0
  fi
fi

echo "buf lint protos/"
"$BUF" lint protos

if ! git rev-parse --git-dir >/dev/null 2>&1; then
  echo "not a git checkout: skipping the breaking-change check"
  exit 0
fi
if ! git rev-parse --verify -q "$REF^{commit}" >/dev/null; then
  echo "no commit $REF (first commit or shallow clone): skipping the breaking-change check"
  exit 0
fi
if [ -z "$(git log -1 --format=%H "$REF" -- protos)" ]; then
  echo "no commit up to $REF touches protos/: skipping the breaking-change check"
  exit 0
fi
echo "buf breaking protos/ against $REF ($(git rev-parse --short "$REF"))"
"$BUF" breaking protos --against ".git#ref=$(git rev-parse "$REF"),subdir=protos"
