# Sourced by bin/demo and bin/test: make sure .venv at the repository root exists and has sparsec
# installed (editable, with the dev extras). The work is skipped when the stamp in .venv matches
# pyproject.toml and the torch pin, so only the first run (or a changed pyproject.toml) is slow.
# torch is installed first and pinned: unpinned, pip would resolve a CUDA build of many GB.

SPARSEC_TORCH="torch==2.13.0"
SPARSEC_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SPARSEC_VENV="$SPARSEC_ROOT/.venv"
SPARSEC_PY="$SPARSEC_VENV/bin/python"

sparsec_bootstrap() {
    local stamp="$SPARSEC_VENV/.sparsec-bootstrap" want
    want="$( { sha256sum < "$SPARSEC_ROOT/pyproject.toml"; echo "$SPARSEC_TORCH"; } | sha256sum | cut -d' ' -f1)"
    if [[ -x "$SPARSEC_PY" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return 0
    fi
    echo "bin: setting up $SPARSEC_VENV (first run, or pyproject.toml changed) ..." >&2
    if [[ ! -x "$SPARSEC_PY" ]]; then
        python3 -m venv "$SPARSEC_VENV"
    fi
    "$SPARSEC_PY" -m pip install --quiet --disable-pip-version-check "$SPARSEC_TORCH"
    "$SPARSEC_PY" -m pip install --quiet --disable-pip-version-check -e "$SPARSEC_ROOT[dev]"
    echo "$want" > "$stamp"
}

sparsec_bootstrap
