#!/usr/bin/env bash
# Installs everything ctfs and its tests need on a fresh Debian 12 machine (run as root).
# Used by .ci/run and by examples/quickstart.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
echo "== apt: fuse3, libfuse3, gocryptfs, systemd (for systemd-analyze), util-linux; rclone and s3fs (object-storage peers); libsodium23 (tensorizer, a load peer)" >&2
apt-get update -qq
apt-get install -y -qq --no-install-recommends fuse3 libfuse3-3 gocryptfs systemd util-linux procps \
  rclone s3fs libsodium23 >/dev/null
PY=${PYTHON:-python3}
echo "== pip: torch 2.13.0 (CPU, local file) first, so no resolver pulls another torch" >&2
$PY -m pip install -q "torch==2.13.0"
echo "== pip: ctfs with test extras" >&2
$PY -m pip install -q -e '.[test]' -c .ci/constraints.txt
$PY - <<'PY'
import torch, sys
assert torch.__version__.startswith("2.13.0"), f"torch was replaced: {torch.__version__}"
print(f"torch {torch.__version__} kept", file=sys.stderr)
PY
