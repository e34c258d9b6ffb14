"""The longer fuzzing run of the pattern language (the quick one is tests/test_fuzz.py).

    python bench/fuzz_parser.py                      # hypothesis, ~10 minutes
    python bench/fuzz_parser.py --minutes 2          # shorter
    python bench/fuzz_parser.py --atheris --minutes 10   # coverage-guided, if atheris is installed

Properties, each over many more (and larger) examples than the test suite runs:

* token soup, arbitrary text and mutated valid sources through the whole front end
  (``parse``, ``parse_program``, ``compile``, a layout, the generated kernel source) raise
  nothing but ``PatternError``;
* random valid ASTs (IR built with ``|``, ``&`` and ``dilate``) and random ``.attn``
  programs print canonical source that re-parses to an equal IR;
* no single input takes more than a second (``--slow``) to parse.

Hypothesis keeps failing examples in ``.hypothesis/`` (re-run to replay them). With
``--atheris`` (``pip install atheris``), libFuzzer mutates bytes decoded as text and as
token sequences; a crash leaves its input in the current directory. Exit status 0 when
every property held.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("PATTERNCC_CACHE_DIR", str(Path(os.environ.get("TMPDIR", "/tmp")) / "pcc-fuzz-kernels"))

import patterncc  # noqa: E402
from patterncc import PatternError  # noqa: E402

SLOWEST: list[tuple[float, str]] = []


def timed(fn, src, slow):
    t0 = time.perf_counter()
    try:
        return fn(src)
    finally:
        dt = time.perf_counter() - t0
        SLOWEST.append((dt, src[:200]))
        SLOWEST.sort(reverse=True)
        del SLOWEST[5:]
        if dt > slow:
            raise AssertionError(f"{dt:.2f} s to process {len(src)} characters: {src[:200]!r}")


def run_hypothesis(minutes: float, slow: float) -> int:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from strategies import LANGUAGE_TOKENS, pattern_sources, program_sources, token_soup
    from test_fuzz import _printable, front_end, ir_patterns

    def front(src):
        timed(front_end, src, slow)

    def roundtrip(p):
        if _printable(p):
            again = timed(patterncc.parse, str(p), slow)
            assert again == p and str(again) == str(p), str(p)

    def program_roundtrip(case):
        src, _ = case
        prog = timed(patterncc.parse_program, src, slow)
        assert patterncc.parse_program(str(prog)) == prog, src

    @st.composite
    def mutated(draw):
        src = draw(pattern_sources(max_index=64, num_heads=4, max_leaves=8))
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(src)))
            j = draw(st.integers(i, min(len(src), i + 6)))
            ins = draw(st.one_of(st.sampled_from(LANGUAGE_TOKENS), st.text(max_size=4)))
            src = src[:i] + ins + src[j:]
        return src

    props = [
        ("token soup", token_soup(max_tokens=120), front),
        ("arbitrary text", st.text(max_size=400), front),
        ("mutated sources", mutated(), front),
        ("random ASTs", ir_patterns(max_leaves=40), roundtrip),
        ("random programs", program_sources(max_index=64, num_heads=4, max_layers=24), program_roundtrip),
    ]
    deadline = time.time() + 60 * minutes
    rounds, failures = 0, 0
    while time.time() < deadline:
        for name, strategy, prop in props:
            if time.time() >= deadline:
                break
            budget = max(5.0, (deadline - time.time()) / len(props))
            t0 = time.time()
            n = 0
            cfg = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck),
                           database=None if os.environ.get("FUZZ_NO_DB") else settings().database)
            while time.time() - t0 < min(budget, 60) and time.time() < deadline:
                try:
                    settings(cfg)(given(strategy)(prop))()
                except Exception:  # noqa: BLE001 - reported and counted
                    failures += 1
                    print(f"FAIL {name}:\n{traceback.format_exc()}", flush=True)
                    break
                n += 200
            print(f"round {rounds}: {name}: {n} examples, {time.time() - t0:.0f} s", flush=True)
        rounds += 1
    print(f"done: {rounds} rounds, {failures} failing properties; slowest inputs:")
    for dt, src in SLOWEST:
        print(f"  {dt * 1000:7.1f} ms  {src[:100]!r}")
    return 1 if failures else 0


def run_atheris(minutes: float, slow: float) -> int:
    import atheris

    from strategies import LANGUAGE_TOKENS
    from test_fuzz import front_end

    def one_input(data: bytes):
        fdp = atheris.FuzzedDataProvider(data)
        if fdp.ConsumeBool():
            src = fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes())
        else:  # token sequences reach deeper into the grammar than raw bytes
            n = fdp.ConsumeIntInRange(0, 200)
            src = "".join(LANGUAGE_TOKENS[fdp.ConsumeIntInRange(0, len(LANGUAGE_TOKENS) - 1)] for _ in range(n))
        try:
            timed(front_end, src, slow)
        except PatternError:
            pass

    seconds = int(60 * minutes)
    atheris.instrument_all()
    atheris.Setup([sys.argv[0], f"-max_total_time={seconds}", "-rss_limit_mb=4096", "-timeout=10"], one_input)
    atheris.Fuzz()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="how long to fuzz (default 10)")
    ap.add_argument("--slow", type=float, default=1.0, help="fail an input that takes longer (seconds)")
    ap.add_argument("--atheris", action="store_true", help="coverage-guided fuzzing with atheris (libFuzzer)")
    args = ap.parse_args()
    if args.atheris:
        return run_atheris(args.minutes, args.slow)
    return run_hypothesis(args.minutes, args.slow)


if __name__ == "__main__":
    sys.exit(main())
