#!/usr/bin/env bash
# Rewrite docker/constraints.txt from the venv that passed the tests, so the image gets the
# same package versions (and therefore the same numbers) as that venv.
#   docker/update-constraints.sh [PYTHON]     PYTHON defaults to .venv/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-.venv/bin/python}
out=docker/constraints.txt
{
    cat <<'HEADER'
# Versions the container image is built with: pip *constraints*, not requirements (a package
# listed here is installed only if Trajectome needs it). They are the versions of the venv the
# test suite passed in; regenerate with docker/update-constraints.sh after changing dependencies.
HEADER
    # Test-only tools and the project itself are not constraints of the image.
    "$python" -m pip freeze --exclude-editable \
        --exclude trajectome --exclude pytest --exclude ruff --exclude pluggy --exclude iniconfig
} > "$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $out ($(grep -vc '^#' "$out") packages)"
