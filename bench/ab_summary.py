"""Summarise interleaved A/B rounds: the JSON lines of ``bench/ab_interleaved.py``, one A/B or
many (``bench/device_ab.sh`` runs a list of them into one file). No GPU needed.

Per A/B (one switch on one pattern, T and D): the rounds' mean kernel times of the default and
the variant, forward+backward (the profiler's kernel sum), each kernel, and the forward in
CUDA-graph replay, with the variant's change. A long run can drift (an H100 at T=65536 slowed
by 5-7% over one call as it warmed), which moves both variants' rounds alike but not equally:
for a switch that leaves the forward kernel's code alone, each backward kernel's change
relative to the forward's of the same rounds (``dq/fwd``, ``dkdv/fwd``) takes the drift out.
Rounds recorded since the twenty-eighth session carry the SM clock and power nvidia-smi
sampled during them (``sm_clock_mhz``, ``power_w``): the table gives the clock's means.
The ``f+b by round`` column is the forward+backward change within each round (the variant
against the default of the same round), lowest to highest: an A/A on the H100 (the same
kernels both sides, thirtieth session) spread from -0.8% to +1.7% that way, so a change
whose rounds straddle zero, or that is under about 1%, is not resolved by one A/B. The
``graph by round`` column does the same for the forward in CUDA-graph replay, which the
first timed slot's higher clocks did not bias (thirty-first session: the A/A's forward moved
-0.2% to +0.8% a round there, while the profiler's kernel durations spread more).

    python bench/ab_summary.py bench/results/2026-12-07-NVIDIA-H100-80GB-HBM3-run28-ab-pairs-cap128.jsonl
    bash bench/device_ab.sh | ...                 (or: python bench/ab_summary.py - < ab.jsonl)
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

KERNELS = {"_attn_fwd": "fwd", "_attn_bwd_dq": "dq", "_attn_bwd_dkdv": "dkdv"}


def read_records(lines) -> list[dict]:
    """The JSON records among ``lines`` (other lines, a log's text, are skipped)."""
    records = []
    for line in lines:
        line = line.strip()
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return [r for r in records if "variant" in r and "kernel_ms" in r]


def _ab_key(record: dict) -> tuple:
    return record.get("pattern"), record.get("T"), record.get("D"), record.get("ablate")


def sections(records: list[dict]) -> list[list[dict]]:
    """Consecutive records of one A/B: the same pattern, T, D and switch. The switch is the
    record's ``ablate`` (ab_interleaved.py writes it); records without it (older files) start
    a new A/B where the round number falls back (a run starts at round 0)."""
    out: list[list[dict]] = []
    for r in records:
        if out:
            last = out[-1][-1]
            same = _ab_key(last) == _ab_key(r)
            restarted = r.get("ablate") is None and r.get("round", 0) < last.get("round", 0)
            switch = {x["variant"] for x in out[-1]} - {"default"}
            other = r["variant"] != "default" and switch and r["variant"] not in switch
            if same and not restarted and not other:
                out[-1].append(r)
                continue
        out.append([r])
    return out


def _mean(rows: list[dict], read) -> float | None:
    values = [read(r) for r in rows]
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _change(new: float | None, old: float | None) -> float | None:
    return None if new is None or not old else new / old - 1


def round_changes(default: list[dict], variant: list[dict], read) -> list[float]:
    """The variant's change against the default within each round both have a value in, by
    round number."""
    base = {r.get("round"): read(r) for r in default}
    return [read(r) / base[r.get("round")] - 1 for r in variant
            if base.get(r.get("round")) and read(r) is not None]


def summary(section: list[dict]) -> dict:
    """One A/B's means per variant and the variant's changes (fractions: -0.05 is 5% faster),
    with ``by_round``: the forward+backward kernel change of each round (round_changes), and
    ``graph_by_round``: the same for the forward in graph replay."""
    default = [r for r in section if r["variant"] == "default"]
    variant = [r for r in section if r["variant"] != "default"]
    if not default or not variant:
        raise ValueError(f"an A/B needs rounds of both the default and a variant: {section[0]}")
    name = variant[0]["variant"]
    out = {"pattern": section[0].get("pattern"), "T": section[0].get("T"), "D": section[0].get("D"),
           "ablate": section[0].get("ablate") or name, "rounds": min(len(default), len(variant)), "ms": {},
           "change": {}}
    columns = {"fwdbwd_kernels": lambda r: r.get("kernel_ms"), "fwd_graph": lambda r: r.get("fwd_graph_ms"),
               "sm_clock": lambda r: r.get("sm_clock_mhz")}
    columns |= {short: (lambda r, k=kernel: r.get("kernels", {}).get(k)) for kernel, short in KERNELS.items()}
    for column, read in columns.items():
        a, b = _mean(default, read), _mean(variant, read)
        out["ms"][column] = (a, b)
        out["change"][column] = _change(b, a)
    fwd = out["change"].get("fwd")
    for short in ("dq", "dkdv"):
        own = out["change"].get(short)
        if own is not None and fwd is not None:
            out["change"][f"{short}/fwd"] = (1 + own) / (1 + fwd) - 1
    out["by_round"] = round_changes(default, variant, columns["fwdbwd_kernels"])
    out["graph_by_round"] = round_changes(default, variant, columns["fwd_graph"])
    return out


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.1f}%"


def _before_after(pair: tuple, digits: int = 4) -> str:
    a, b = pair
    return "—" if a is None or b is None else f"{a:.{digits}f} → {b:.{digits}f}"


def _spread(changes: list[float]) -> str:
    return "—" if not changes else f"{100 * min(changes):+.1f} .. {100 * max(changes):+.1f}%"


def markdown(summaries: list[dict]) -> str:
    """A table, one row per A/B: default → variant ms and the change."""
    lines = ["| switch | pattern | T | D | rounds | f+b kernels ms | change | f+b by round | dK/dV ms | change "
             "| dK/dV ÷ fwd | dQ | dQ ÷ fwd | fwd kernel | fwd graph | graph by round | SM MHz |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        c = s["change"]
        lines.append(f"| {s['ablate']} | {s['pattern']} | {s['T']} | {s['D']} | {s['rounds']} | "
                     f"{_before_after(s['ms']['fwdbwd_kernels'])} | {_pct(c['fwdbwd_kernels'])} | "
                     f"{_spread(s.get('by_round', []))} | "
                     f"{_before_after(s['ms']['dkdv'])} | "
                     f"{_pct(c['dkdv'])} | {_pct(c.get('dkdv/fwd'))} | {_pct(c['dq'])} | {_pct(c.get('dq/fwd'))} | "
                     f"{_pct(c['fwd'])} | {_pct(c['fwd_graph'])} | {_spread(s.get('graph_by_round', []))} | "
                     f"{_before_after(s['ms']['sm_clock'], 0)} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    paths = argv[1:] or ["-"]
    records = []
    for path in paths:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
        records += read_records(text.splitlines())
    if not records:
        print("no A/B records (JSON lines of bench/ab_interleaved.py) in " + ", ".join(paths), file=sys.stderr)
        return 1
    print(markdown([summary(s) for s in sections(records)]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
