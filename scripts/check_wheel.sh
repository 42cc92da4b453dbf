#!/usr/bin/env bash
# What `pip install --no-build-isolation .` gives a user (not the editable install the tests use):
# build the wheel, unpack it alone, and import every module of the package from it.
# Usage: scripts/check_wheel.sh [PYTHON]      (make wheel; .ci/run calls it)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-.venv/bin/python}
out=build/wheel-check
rm -rf "$out"
mkdir -p "$out"
"$py" -m pip wheel -q --no-build-isolation --no-deps -w "$out" . > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
"$py" -m pip install -q --no-deps --target "$out/site" "$out"/fastvideo_offload-*.whl
# -P keeps the checkout (and its in-place build) off sys.path: only the wheel's files can import.
PYTHONPATH="$PWD/$out/site" "$py" -P - <<'PY'
import importlib, pkgutil
import fastvideo_offload
assert "/wheel-check/site/" in fastvideo_offload.__file__, fastvideo_offload.__file__
names = [m.name for m in pkgutil.walk_packages(fastvideo_offload.__path__, "fastvideo_offload.")]
for name in names:
    importlib.import_module(name)
print(f"wheel: {len(names)} modules import from {fastvideo_offload.__file__}")
PY
