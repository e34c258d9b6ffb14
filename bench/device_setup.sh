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
# Inductor's cache (FlexAttention's compiled graphs and their Triton kernels; patterncc's own
# kernels stay in Triton's cache): .devcache/inductor.tgz (or its parts), when carried, is an
# earlier call's $OUT/inductor.tgz* (save_inductor_cache), so Flex's compile is a cache hit on a
# fresh machine where the graph is the same one (thirty-first session: a block mask's compile hit
# for the same mask shape, 6.7 s against 200 s; not when Dynamo had made a size symbolic). With
# bench_attention.flex_block_mask, what is left to spare is Flex's own compile, 5-10 s a pattern.
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
mkdir -p "$TORCHINDUCTOR_CACHE_DIR"
# Whole, or in parts (save_inductor_cache), which then are what counts.
cache_files=$(ls .devcache/inductor.tgz.part-* 2>/dev/null || ls .devcache/inductor.tgz 2>/dev/null)
if [ -n "$cache_files" ]; then
  cat $cache_files | tar -xz -C "$TORCHINDUCTOR_CACHE_DIR" \
    && echo "inductor cache carried: $(find "$TORCHINDUCTOR_CACHE_DIR" -type f | wc -l) files" | tee -a "$OUT/gpu.txt"
fi
# save_inductor_cache: Inductor's cache packed into $OUT/inductor.tgz, for `carry` (.devcache/) next
# call; cut into parts of 15 MiB (inductor.tgz.part-00, -01, ...) where it is over what one file
# from $OUT may be (16 MiB: the thirtieth session's cache after four 16K rows packed to 23 MiB).
# At most 8 files come back from $OUT: a call that saves the cache leaves room for it (the
# twenty-ninth session's call wrote 9, and the cache was the one left out).
save_inductor_cache() {
  tar -czf "$OUT/inductor.tgz" -C "$TORCHINDUCTOR_CACHE_DIR" . || return
  local size files; size=$(stat -c %s "$OUT/inductor.tgz")
  if [ "$size" -gt $((15 * 1024 * 1024)) ]; then
    split -b 15M -d "$OUT/inductor.tgz" "$OUT/inductor.tgz.part-" && rm "$OUT/inductor.tgz"
  fi
  files=$(find "$OUT" -type f | wc -l)
  echo "inductor cache: $((size >> 10)) KiB in $(ls "$OUT"/inductor.tgz* | wc -l) file(s), \$OUT/inductor.tgz*"
  [ "$files" -le 8 ] || echo "inductor cache: \$OUT holds $files files, over the 8 that come back"
}

# gpu_tests_start DIR [FILTER]: tests/gpu (those matching -k FILTER) split into ${CHUNKS:-6}
# pytest processes started in the background (the tests are compile-bound), logs in DIR;
# after `wait`, gpu_tests_report DIR writes each chunk's failures and tail to $OUT/gpu-tests.txt.
gpu_tests_start() {
  local dir=$1 filter=${2:-} chunks=${CHUNKS:-6} i
  python3 -m pytest tests/gpu -q --collect-only -p no:cacheprovider ${filter:+-k "$filter"} 2>/dev/null \
    | grep "::" > "$dir/nodes.txt"
  echo "$(wc -l < "$dir/nodes.txt") GPU tests in $chunks processes"
  for i in $(seq 0 $((chunks - 1))); do
    mapfile -t nodes < <(awk -v n="$chunks" -v i="$i" 'NR % n == i' "$dir/nodes.txt")  # ids hold spaces, '|'
    [ ${#nodes[@]} -gt 0 ] || continue
    (timeout ${TEST_TIMEOUT:-330} python3 -m pytest -q -p no:cacheprovider "${nodes[@]}" \
       > "$dir/t-$i.txt" 2>&1; echo "rc $? (chunk $i)" >> "$dir/t-$i.txt") &
  done
}
gpu_tests_report() {
  local f
  for f in "$1"/t-*.txt; do
    [ -e "$f" ] || continue
    echo "== $(basename "$f")"; grep -E "FAILED|Error" "$f" | head -20; tail -n 3 "$f"
  done > "$OUT/gpu-tests.txt"
  grep -hE "^== |passed|failed|rc " "$OUT/gpu-tests.txt"
}
