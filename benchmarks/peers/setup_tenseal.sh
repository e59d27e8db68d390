#!/usr/bin/env bash
# Creates (or completes) the TenSEAL 0.3.18 virtualenv that benchmarks/peers/tenseal_tutorial4.py runs in.
#
# Why a separate venv: TenSEAL bundles its own SEAL build, and `tenseal.sealapi` and seal-python
# (veil's binding) are separate compiled copies of SEAL whose serializations do not interoperate;
# keeping the peer out of veil's venv means neither can shadow the other. The tutorial-4 inference
# path needs only tenseal and numpy (no torch: the runner reads weights and images from an .npz).
#
# Idempotent: re-running only installs what is missing. Path: $TENSEAL_VENV (default /work/tenseal-venv).
# Python: $TENSEAL_PYTHON_BIN (default python3.11).
set -euo pipefail

VENV="${TENSEAL_VENV:-/work/tenseal-venv}"
PY="${TENSEAL_PYTHON_BIN:-python3.11}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

TENSEAL_SPEC="tenseal==0.3.18"
NUMPY_SPEC="numpy==2.4.6"  # the version veil's venv and the CrypTen venv use

# shellcheck source=_venv.sh
source "$HERE/_venv.sh"
ensure_venv "$VENV" "$PY"

have numpy "${NUMPY_SPEC##*==}" || "${PIP[@]}" install "$NUMPY_SPEC"
have tenseal 0.3.18 || "${PIP[@]}" install "$TENSEAL_SPEC"

# guard: no torch (nothing on this path needs it) and no CUDA packages
refuse_packages TenSEAL torch triton

# smoke test: the runner imports, and one tiny encrypted product through the tutorial's parameters decrypts
"$VENV/bin/python" -c "
import sys
sys.path.insert(0, '$HERE')
import tenseal_tutorial4 as t4
ctx = t4.make_context()
out = t4.ts.ckks_vector(ctx, [1.0, 2.0]).mm([[1.0], [1.0]]).decrypt()
assert abs(out[0] - 3.0) < 0.05, out  # 26-bit scale: about 1e-3
import importlib.metadata as m
print('TenSEAL', m.version('tenseal'), 'numpy', m.version('numpy'), 'ready in $VENV')
"
