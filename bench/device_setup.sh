# Sourced by the bench/device_*.sh scripts: lark (carried as a wheel in .whl/) on the path,
# this checkout importable, a private kernel cache, and the GPU's state on record.
OUT=${OUT:-out}; mkdir -p "$OUT"
# The tests' hypothesis (with attrs and sortedcontainers) only where the image lacks it: a
# carried copy would shadow the image's own packages (a carried pytest broke the image's
# pytest-timeout plugin, 2026-12-06).
wheels=$(ls .whl/lark-*.whl)
python3 -c "import hypothesis" 2>/dev/null || wheels="$wheels $(ls .whl/hypothesis-*.whl .whl/attrs-*.whl .whl/sortedcontainers-*.whl 2>/dev/null)"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 PATTERNCC_CACHE_DIR=/tmp/pcc
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.version.cuda)" | tee -a "$OUT/gpu.txt"
