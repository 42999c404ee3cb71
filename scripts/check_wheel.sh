#!/usr/bin/env bash
# Packaging check, as a user installs: build the wheel, install it into a fresh virtual
# environment (CPU torch first), then, from outside the checkout, import every sub-package
# and run `pvae compare --quick --dataset digits`. Used by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${PVAE_TORCH_SPEC:-torch==2.13.0}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m pip wheel --quiet --no-deps -w "$work/dist" .
wheel=$(ls "$work"/dist/pyro_vae-*.whl)
"$PYTHON" -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install --quiet "$TORCH_SPEC"
"$py" -m pip install --quiet "$wheel[data]"
cd "$work"
"$py" - <<'PY'
import importlib, pkgutil, sys
import pvae
assert "site-packages" in pvae.__file__, f"pvae imported from {pvae.__file__}, not the wheel"
names = ["pvae.models", "pvae.inference"] + [
    m.name for m in pkgutil.walk_packages(pvae.__path__, "pvae.")
]
for name in names:
    importlib.import_module(name)
for top in ("models", "inference"):
    if importlib.util.find_spec(top) is not None:
        sys.exit(f"the wheel installed a top-level package named {top!r}")
print(f"wheel: {len(names)} modules import from {pvae.__file__}")
PY
"$work/venv/bin/pvae" compare --quick --dataset digits --run-dir "$work/compare" >"$work/compare.log" 2>&1 || {
    cat "$work/compare.log"; exit 1; }
test -s "$work/compare/results.md"
echo "wheel: pvae compare --quick --dataset digits ran from outside the checkout"
