#!/usr/bin/env bash
# Regenerate the committed example dataset (deterministic: same seed -> same bytes).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python3}"
rm -rf "$here/ds-ect"
if command -v trajectome-simulate >/dev/null 2>&1; then
    trajectome-simulate "$here/ds-ect" --preset example --subjects 2 --controls 1 --seed 20261122
else
    (cd "$here/.." && "$python" -m pipeline.simulate "$here/ds-ect" --preset example \
        --subjects 2 --controls 1 --seed 20261122)
fi
