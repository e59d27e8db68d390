# Sourced by the setup_*.sh scripts of this directory (not run on its own): the virtualenv steps
# every peer shares, so each script keeps only its own packages and checks.
#
#   ensure_venv VENV PY    create VENV with the interpreter PY if it is missing; refuse (exit 1) a
#                          VENV that exists but is not Python 3.11. Sets PIP to its quiet pip.
#   have DIST VERSION      true if VENV has exactly that distribution version (so re-running a
#                          setup script installs only what is missing).
#   refuse_packages LABEL NAME...
#                          fail if VENV holds any CUDA package (nvidia-*) or any NAME (e.g. torch,
#                          triton): a peer venv never pulls a GPU build or a second torch.

ensure_venv() {
    VENV="$1"
    local py="$2"
    if [[ -x "$VENV/bin/python" ]] && ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
        echo "error: $VENV exists but is not Python 3.11; remove it first" >&2
        exit 1
    fi
    if [[ ! -x "$VENV/bin/python" ]]; then
        echo "creating $VENV with $("$py" --version)"
        "$py" -m venv "$VENV"
    fi
    PIP=("$VENV/bin/pip" --disable-pip-version-check -q)
}

have() {
    [[ "$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null)" == "$2" ]]
}

refuse_packages() {
    "$VENV/bin/python" - "$@" <<'EOF'
import importlib.metadata as m
import sys

label, refused = sys.argv[1], {name.lower() for name in sys.argv[2:]}
names = {d.metadata["Name"].lower() for d in m.distributions()}
bad = sorted(n for n in names if n.startswith("nvidia") or n in refused)
assert not bad, f"unexpected packages in the {label} venv: {bad}"
EOF
}
