# Sourced by scripts/test and scripts/demo: make .venv with Python >= 3.11 and install fota.
# Usage: fota_venv EXTRAS   (EXTRAS like "[test]" or "")
fota_venv() {
  local extras="$1" py="${PYTHON:-}"
  if [ -z "$py" ]; then
    for candidate in python3.13 python3.12 python3.11 python3; do
      if command -v "$candidate" >/dev/null 2>&1 &&
         "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        py="$candidate"; break
      fi
    done
  fi
  if [ -z "$py" ]; then
    echo "fota: needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
    return 1
  fi
  if [ ! -x .venv/bin/python ]; then
    "$py" -m venv .venv || { echo "fota: '$py -m venv' failed (Debian: apt-get install python3-venv)" >&2; return 1; }
  fi
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}"
}
