"""Launch configurations of the Triton kernels, chosen per (kernel, head dim, dtype, GPU).

A configuration is the owned tile (rows a program keeps: queries in the forward and dQ,
keys in dK/dV; taller than the layout block, it stacks layout blocks), the walked tile,
``num_warps`` and ``num_stages``. Configurations come in two classes, by the layout they
run: ``tall`` where the lowering takes 128-row tiles (``lowering.row_class``: a band in
residue order, such as a dilated window), ``flat`` where it does not (contiguous bands,
BigBird's scattered random blocks; rows then hold at most 64 positions, or one layout
block if that is larger).
:func:`config_for` looks one up, in this order:

1. ``CONFIGS[(kind, width)]``: set by hand (and by tests), for every GPU;
2. the tuning cache: what the autotuner measured on this GPU before, in memory and in
   ``$PATTERNCC_CACHE_DIR/tuning.json`` (default ``~/.cache/patterncc/tuning.json``);
3. ``TUNED``: the table measured with ``bench/tune.py`` on the GPUs it names
   (bench/RESULTS.md has the runs);
4. ``DEFAULT``.

The autotuner (:func:`autotune`) times each candidate of ``CANDIDATES[kind]`` that fits the
class (every candidate for tall, those of at most 64 owned rows for flat) on the call at
hand (CUDA events, median of a few runs) and caches the fastest under the key (kernel,
head-dim class, dtype, GPU name, class): the sequence length, batch and pattern are not
part of it, so a new length never re-tunes. It runs on the first call for a key when the
GPU is missing from ``TUNED`` or ``PATTERNCC_AUTOTUNE=1`` (``0`` turns it off), never
while a CUDA graph is being captured and never under Triton's CPU interpreter.

Example:
    >>> import torch
    >>> from patterncc.backends import tuning
    >>> tuning.config_for("fwd", 64, torch.bfloat16, None)   # no GPU: the default
    KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=2, tma=False, maxnreg=None)
    >>> tuning.cache_key("dq", 80, torch.float16, "NVIDIA H200", tall=True)
    'dq/128/float16/tall/NVIDIA H200'
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

KINDS = ("fwd", "dq", "dkdv")


@dataclass(frozen=True)
class KernelConfig:
    """Launch configuration of one kernel. ``block_m`` is the query tile and ``block_n``
    the key tile (dK/dV owns keys: its ``block_n`` may stack layout blocks, its
    ``block_m`` is at most one); ``num_warps`` and software-pipelining ``num_stages``;
    ``tma``: fetch the walked tiles through Hopper tensor descriptors (token order, D a
    multiple of 16 bytes; else by pointers); ``maxnreg``: a cap on registers per thread
    (None: the compiler's choice), so that more programs fit on an SM -- ptxas gives an
    8-warp 128-row forward 175-250 registers, one program per SM, where 128 suffice."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    tma: bool = False
    maxnreg: int | None = None


K = KernelConfig
DEFAULT = K()

# Set by hand to force a configuration on every GPU: CONFIGS[("fwd", 64)] = KernelConfig(...).
CONFIGS: dict[tuple[str, int], KernelConfig] = {}

# Measured with bench/tune.py (bench/RESULTS.md): {GPU name prefix: {(kind, width, tall): config}},
# from bf16 runs; fp16 shares them, fp32 falls back to DEFAULT. Only measured entries go
# here; a GPU or key not listed autotunes once. "NVIDIA H200": the 2026-12-01 sweeps at
# T=65536, H=16 (bench/results/2026-12-01-NVIDIA-H200-tune.json; the tall class from
# -run3-tune.json, after the order-mode-1 kernels; D=64 forward and dQ from -run4-tune.json,
# where the register-capped candidates won; D=128 tall forward from 2026-12-02-NVIDIA-H200-run6-
# tune-fwd.json, with residue-order TMA boxes; D=128 flat dQ from 2026-12-03-NVIDIA-H200-run12-
# tune-bwd128-20dabc5.json, 2-stage TMA, 0.93x the time of the untuned entry), best geometric mean
# over the class's reference patterns: flat = longformer, BigBird, causal window; tall =
# the dilated window in residue order (lowering.row_class). "NVIDIA H100": the 2026-12-06
# shortlist sweep at T=65536, H=16 (bench/tune.py SHORTLIST=1: the H200 sweeps' winners and
# runners-up; bench/results/2026-12-06-NVIDIA-H100-80GB-HBM3-run17-tune-shortlist-*.json): the
# H200's winners again, and for the tall class at D=128 the 2-stage TMA dQ (0.89x the untuned
# entry's time) and dK/dV (0.88x), which the H200's tall sweeps never tried. Its D=64 dK/dV
# tile is capped at 128 registers (twenty-eighth session: ptxas gives it 150-154, three programs
# per SM; capped, four fit, with 2-39 spill instructions, none in the walk's loops): dK/dV
# -4% (longformer, 16K) to -6% (the dilated window), +2% on BigBird, the causal window alike,
# by interleaved A/B with LSE and Delta as pairs (bench/RESULTS.md). Not measured on an H200.
TUNED: dict[str, dict[tuple[str, int, bool], KernelConfig]] = {
    "NVIDIA H200": {
        ("fwd", 64, False): K(64, 64, 4, 2, True, 128), ("fwd", 64, True): K(64, 64, 4, 2, True, 128),
        ("dq", 64, False): K(64, 64, 4, 2, True, 128), ("dq", 64, True): K(64, 64, 4, 2, True, 128),
        ("dkdv", 64, False): K(32, 64, 4, 3), ("dkdv", 64, True): K(32, 64, 4, 3),
        ("fwd", 128, False): K(64, 64, 4, 3, True), ("fwd", 128, True): K(64, 64, 4, 3, True),
        ("dq", 128, False): K(64, 64, 4, 2, True), ("dq", 128, True): K(64, 64, 4, 2),
        ("dkdv", 128, False): K(64, 64, 4, 3, True), ("dkdv", 128, True): K(64, 64, 4, 2),
    },
    "NVIDIA H100": {
        ("fwd", 64, False): K(64, 64, 4, 2, True, 128), ("fwd", 64, True): K(64, 64, 4, 2, True, 128),
        ("dq", 64, False): K(64, 64, 4, 2, True, 128), ("dq", 64, True): K(64, 64, 4, 2, True, 128),
        ("dkdv", 64, False): K(32, 64, 4, 3, maxnreg=128),
        ("dkdv", 64, True): K(32, 64, 4, 3, maxnreg=128),
        ("fwd", 128, False): K(64, 64, 4, 3, True), ("fwd", 128, True): K(64, 64, 4, 3, True),
        ("dq", 128, False): K(64, 64, 4, 2, True), ("dq", 128, True): K(64, 64, 4, 2, True),
        ("dkdv", 128, False): K(64, 64, 4, 3, True), ("dkdv", 128, True): K(64, 64, 4, 2, True),
    },
}

# What the autotuner tries (the first is the fallback if every candidate fails).
# The capped entries (maxnreg=128) compile without spills at D=64 (ptxas, Triton 3.6,
# sm_90a; bench/RESULTS.md): 8-warp 128-row tiles, two programs per SM instead of one, and
# 2-stage 64-row tiles with TMA, four programs per SM instead of three.
CANDIDATES: dict[str, list[KernelConfig]] = {
    "fwd": [K(64, 64, 4, 2), K(128, 64, 4, 3), K(128, 64, 8, 3), K(128, 32, 4, 3), K(128, 64, 8, 2),
            K(64, 64, 4, 3), K(64, 64, 4, 3, True), K(128, 64, 8, 3, True),
            K(128, 64, 8, 3, maxnreg=128), K(128, 64, 8, 3, True, maxnreg=128), K(64, 64, 4, 2, True, maxnreg=128)],
    "dq": [K(64, 64, 4, 2), K(128, 32, 4, 3), K(128, 64, 8, 2), K(128, 32, 8, 2), K(64, 32, 4, 3),
           K(64, 64, 4, 3, True), K(128, 32, 8, 2, True), K(128, 32, 8, 2, maxnreg=128),
           K(64, 64, 4, 2, True, maxnreg=128), K(64, 64, 4, 2, True)],
    "dkdv": [K(64, 64, 4, 2), K(32, 128, 4, 3), K(64, 128, 8, 2), K(32, 128, 8, 2), K(32, 64, 4, 3),
             K(64, 64, 4, 3, True), K(32, 128, 8, 2, True), K(64, 64, 4, 2, True), K(32, 64, 4, 3, maxnreg=128)],
}


def owned_rows(kind: str, cfg: KernelConfig) -> int:
    """The tile a program of ``kind`` owns: queries (forward, dQ) or keys (dK/dV)."""
    return cfg.block_n if kind == "dkdv" else cfg.block_m


def candidates(kind: str, tall: bool) -> list[KernelConfig]:
    """The autotuner's candidates for a class: all for tall layouts, those owning at most
    lowering.FLAT_ROWS rows for flat ones."""
    from ..lowering import FLAT_ROWS
    return [c for c in CANDIDATES[kind] if tall or owned_rows(kind, c) <= FLAT_ROWS]


def width_class(head_pad: int) -> int:
    """Head-dim class of a padded head dim: 64, 128 or 256."""
    return 64 if head_pad <= 64 else 128 if head_pad <= 128 else 256


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def cache_key(kind: str, head_pad: int, dtype: torch.dtype, device_name: str, tall: bool = False) -> str:
    return f"{kind}/{width_class(head_pad)}/{_dtype_name(dtype)}/{'tall' if tall else 'flat'}/{device_name}"


_lock = threading.Lock()
_memory: dict[str, KernelConfig] = {}
_disk_loaded = False
_generation = 0  # bumped whenever the autotuner's cache changes (record, clear)


def fingerprint() -> tuple:
    """What config_for's answers depend on besides its arguments, as a key for launch
    constants built from them: the autotuner cache's generation, ``CONFIGS`` and the
    tables of ``TUNED`` (replace a table to change it; edits inside one are not seen by
    launches already built)."""
    return (_generation, tuple(CONFIGS.items()) if CONFIGS else (),
            tuple((name, id(table)) for name, table in TUNED.items()))


def tuning_file() -> Path:
    from ..codegen import cache_dir
    return cache_dir().parent / "tuning.json"


def _load_disk() -> None:
    global _disk_loaded
    if _disk_loaded:
        return
    _disk_loaded = True
    try:
        data = json.loads(tuning_file().read_text())
        for key, cfg in data.items():
            _memory.setdefault(key, KernelConfig(**cfg))
    except (OSError, ValueError, TypeError):  # missing, unreadable or corrupted: start afresh
        pass


def _save_disk() -> None:
    path = tuning_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="tuning.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({k: asdict(v) for k, v in sorted(_memory.items())}, f, indent=1)
        os.replace(tmp, path)
    except OSError:  # read-only cache directory: keep the results in memory
        pass


def tuned(kind: str, head_pad: int, dtype: torch.dtype, device_name: str, tall: bool = False) -> KernelConfig | None:
    """The autotuner's cached choice for this key, if any."""
    with _lock:
        _load_disk()
        return _memory.get(cache_key(kind, head_pad, dtype, device_name, tall))


def table_config(kind: str, head_pad: int, dtype: torch.dtype, device_name: str,
                 tall: bool = False) -> KernelConfig | None:
    if dtype == torch.float32:
        return None
    for prefix, table in TUNED.items():
        if device_name.startswith(prefix):
            return table.get((kind, width_class(head_pad), tall))
    return None


def config_for(kind: str, head_pad: int, dtype: torch.dtype = torch.bfloat16,
               device_name: str | None = None, tall: bool = False) -> KernelConfig:
    """The configuration of kernel ``kind`` ("fwd", "dq", "dkdv") for a padded head dim,
    dtype, GPU name (None: no GPU, e.g. the interpreter) and layout class."""
    forced = CONFIGS.get((kind, width_class(head_pad)))
    if forced is not None:
        return forced
    if device_name is None:
        return DEFAULT
    return (tuned(kind, head_pad, dtype, device_name, tall)
            or table_config(kind, head_pad, dtype, device_name, tall) or DEFAULT)


def should_autotune(kind: str, head_pad: int, dtype: torch.dtype, device_name: str | None,
                    tall: bool = False) -> bool:
    """Whether the first call for this key measures the candidates (see the module docs)."""
    flag = os.environ.get("PATTERNCC_AUTOTUNE", "").strip().lower()
    if device_name is None or flag in ("0", "false", "off", "no"):
        return False
    if (kind, width_class(head_pad)) in CONFIGS or tuned(kind, head_pad, dtype, device_name, tall) is not None:
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    if flag in ("1", "true", "on", "yes"):
        return True
    return table_config(kind, head_pad, dtype, device_name, tall) is None


def time_ms(run: Callable[[], object], warmup: int = 2, reps: int = 5) -> float:
    """Median time of ``run`` in ms on the current CUDA stream (events around each run)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def autotune(kind: str, head_pad: int, dtype: torch.dtype, device_name: str,
             run: Callable[[KernelConfig], object], timer: Callable | None = None,
             tall: bool = False) -> KernelConfig:
    """Time ``run(config)`` for every candidate of ``kind`` in the class; cache and return
    the fastest. A candidate that fails to compile or launch (registers, shared memory) is
    skipped."""
    timer = timer or time_ms
    results = []
    pool = candidates(kind, tall)
    for cfg in pool:
        try:
            results.append((timer(lambda: run(cfg)), cfg))
        except Exception:  # noqa: BLE001 - an unbuildable candidate is just not chosen
            continue
    best = min(results, key=lambda r: r[0])[1] if results else pool[0]
    record(kind, head_pad, dtype, device_name, best, tall)
    return best


def record(kind: str, head_pad: int, dtype: torch.dtype, device_name: str, config: KernelConfig,
           tall: bool = False) -> None:
    """Cache ``config`` for this key, in memory and in tuning.json (bench/tune.py uses it too)."""
    with _lock:
        _load_disk()
        _memory[cache_key(kind, head_pad, dtype, device_name, tall)] = config
        _bump()
        _save_disk()


def clear() -> None:
    """Forget the autotuner's results in memory (the file stays); for tests."""
    global _disk_loaded
    with _lock:
        _memory.clear()
        _disk_loaded = False
        _bump()


def _bump() -> None:
    global _generation
    _generation += 1
