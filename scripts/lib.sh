# Shared by scripts/serve and scripts/test: a virtual environment that works on a bare Debian.
set -euo pipefail

PYTHON="${PYTHON:-python3}"

ensure_venv() {
    local dir="$1"
    if [ -x "$dir/bin/python" ]; then
        return
    fi
    if ! "$PYTHON" -m venv "$dir" 2>/dev/null; then
        # Debian ships venv separately (python3-venv); install it when we are allowed to.
        rm -rf "$dir"
        if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
            echo "installing python3-venv (Debian keeps venv in its own package)" >&2
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
            "$PYTHON" -m venv "$dir"
        else
            echo "python3 -m venv failed: install python3-venv (apt-get install python3-venv) and retry" >&2
            exit 1
        fi
    fi
    "$dir/bin/python" -m pip install -q --upgrade pip
}
