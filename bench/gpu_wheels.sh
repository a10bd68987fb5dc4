#!/usr/bin/env bash
# Wheels of the pure-Python packages that bench/gpu_check.py needs beyond a plain PyTorch GPU machine
# (torch, torchvision, pytorch-lightning, torchmetrics, numpy, scipy, pillow, matplotlib, tqdm, pyyaml,
# transformers are assumed there), into .whl/ at the repo root, pinned to the versions of our .venv.
# W&B is left out: the check runs every stage with logger=csv and never imports wandb.
#
#   bash bench/gpu_wheels.sh                  # here, with internet or a local index
# then on the GPU machine (no internet), from the repo root:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
#   PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --device cuda --out "$OUT/gpu_check.json"
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PYTHON:-python3} -m pip"
DEST=.whl
# name==version; the versions are those of .venv (`pip list`) when it exists, else these.
PINS=(hydra-core==1.3.8 omegaconf==2.3.1 webdataset==1.0.2 braceexpand==0.1.7)
ANTLR=antlr4-python3-runtime==4.9.3   # omegaconf 2.3 needs 4.9.*; PyPI has only an sdist of it: built here
if [[ -x .venv/bin/python ]]; then
    for i in "${!PINS[@]}"; do
        name=${PINS[$i]%%==*}
        have=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null || true)
        [[ -n "$have" ]] && PINS[$i]="$name==$have"
    done
fi
rm -rf "$DEST" && mkdir -p "$DEST"
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "${PINS[@]}"
$PIP wheel -q --no-deps -w "$DEST" "$ANTLR"   # pure Python: the wheel (py3-none-any) works on any 3.x
for whl in "$DEST"/*.whl; do
    case "$whl" in *-py3-none-any.whl|*-py2.py3-none-any.whl) ;; *) echo "not pure Python: $whl" >&2; exit 1 ;; esac
done
ls -l "$DEST"
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "total: $total bytes ($(( total / 1024 )) KiB) in $(ls "$DEST"/*.whl | wc -l) wheels"
(( total < 50 * 1024 * 1024 )) || { echo "over 50 MiB" >&2; exit 1; }
