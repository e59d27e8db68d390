#!/usr/bin/env bash
# Creates (or completes) the CrypTen 0.4.1 virtualenv that benchmarks/peers/crypten_mnist_training.py runs in.
#
# Why a separate venv: CrypTen 0.4.1 (2022, the last release) declares torchvision and the dead
# `sklearn` stub package as dependencies, neither of which can be installed here, so it is installed
# with --no-deps next to the CPU torch wheel, plus only what `import crypten` really needs
# (numpy, omegaconf, pyyaml, onnx). pandas, scipy, tensorboard and future are declared but not
# imported on the path the runner uses. Nothing in site-packages is edited: the torch 2.13
# incompatibilities are shimmed at run time by crypten_mnist_training.py (see README.md).
#
# Idempotent: re-running only installs what is missing. Path: $CRYPTEN_VENV (default /work/crypten-venv).
# Python: $CRYPTEN_PYTHON_BIN (default python3.11). Torch wheel directory: $TORCH_WHEELS (default /opt/wheels).
set -euo pipefail

VENV="${CRYPTEN_VENV:-/work/crypten-venv}"
PY="${CRYPTEN_PYTHON_BIN:-python3.11}"
WHEELS="${TORCH_WHEELS:-/opt/wheels}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

TORCH_SPEC="torch==2.13.0+cpu"   # the local CPU wheel only; never the CUDA build from the index
CRYPTEN_SPEC="crypten==0.4.1"
# what `import crypten` needs (onnx pulls protobuf, ml_dtypes, typing_extensions); versions as verified
RUNTIME_DEPS=(numpy==2.4.6 omegaconf==2.4.0 PyYAML==6.0.4 onnx==1.23.2)

# shellcheck source=_venv.sh
source "$HERE/_venv.sh"
ensure_venv "$VENV" "$PY"

have torch 2.13.0+cpu || "${PIP[@]}" install --find-links "$WHEELS" "$TORCH_SPEC"
have crypten 0.4.1 || "${PIP[@]}" install --no-deps "$CRYPTEN_SPEC"
missing=()
for dep in "${RUNTIME_DEPS[@]}"; do
    have "${dep%%==*}" "${dep##*==}" || missing+=("$dep")
done
# pip then warns that crypten's other declared dependencies are missing: expected, see README.md
if ((${#missing[@]})); then "${PIP[@]}" install "${missing[@]}"; fi

# guard: CPU torch only, no CUDA packages, and neither of the uninstallable declared dependencies
"$VENV/bin/python" -c '
import torch
assert torch.__version__ == "2.13.0+cpu" and torch.version.cuda is None, torch.__version__
'
refuse_packages CrypTen torchvision sklearn triton

# smoke test: the runner's shims make `import crypten` work on this torch
"$VENV/bin/python" -c "
import sys
sys.path.insert(0, '$HERE')
import crypten_mnist_training  # applies the shims and imports crypten
import importlib.metadata as m
print('CrypTen', m.version('crypten'), 'torch', crypten_mnist_training.torch.__version__, 'ready in $VENV')
"
