"""The ``patterncc`` command: ``compile`` and ``diagnose`` a pattern source.

Pattern errors print with their caret and exit with status 2; no traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import ir
from .errors import PatternError
from .layout import check_block_size
from .parser import load, parse_program

EPILOG_COMPILE = """examples:
  patterncc compile examples/longformer.attn --seq-len 4096 --out out/
  patterncc compile "window(256) | global([0]) | random(64, seed=1) | dilate(2, heads=2)" --seq-len 16384 --heads 16
  patterncc compile "window(1024) & causal" --seq-len 65536 --json
  patterncc compile examples/longformer.attn --seq-len 16384 --out out/ --html
"""

EPILOG_DIAGNOSE = """examples:
  patterncc diagnose examples/longformer.attn --seq-len 4096
  patterncc diagnose "window(256) | global([0])" --seq-len 16384 --layers 12 --out out/
"""


def _source_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="FILE_OR_EXPR",
                   help="a .attn file, or a pattern expression in quotes, e.g. \"window(256) | global([0])\"")
    p.add_argument("--seq-len", type=_positive, required=True, metavar="N",
                   help="sequence length T to build the layout for, e.g. --seq-len 16384")
    p.add_argument("--heads", type=_positive, metavar="H",
                   help="number of attention heads (default: the source's 'heads = H' option, else 1), e.g. --heads 16")
    p.add_argument("--block-size", type=_positive, metavar="B",
                   help="block size in tokens, a power of two 16..256 (default: the source's "
                        "'block_size = B' option, else 64), e.g. --block-size 128")
    p.add_argument("--out", type=Path, metavar="DIR", help="directory to write the outputs to, e.g. --out out/")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patterncc", description="Compile and analyse sparse-attention patterns.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    c = sub.add_parser(
        "compile", help="build the block-sparse layout and report density, FLOPs and memory",
        description="Build the block-sparse layout of a pattern at one sequence length; print density, touched "
                    "blocks, FLOPs and K/V traffic vs dense per layer group and head group. With --out, write "
                    "layout-*.npz, layout.png, report.json and the generated kernel source.",
        epilog=EPILOG_COMPILE, formatter_class=argparse.RawDescriptionHelpFormatter)
    _source_arg(c)
    c.add_argument("--head-dim", type=_positive, default=64, metavar="D",
                   help="head dimension used for FLOP and byte counts (default 64), e.g. --head-dim 128")
    c.add_argument("--html", action="store_true",
                   help="with --out: also write report.html, one self-contained page (pattern source, layout "
                        "pictures, cost table, receptive-field plot) to open in a browser")
    c.set_defaults(func=cmd_compile)
    d = sub.add_parser(
        "diagnose", help="reachability, hop diameter and receptive field per layer",
        description="Analyse what the pattern lets each token see: per-layer receptive fields, hop diameter, "
                    "connectivity and the number of layers to full coverage. With --out, write diagnose.json "
                    "and receptive_field.png.",
        epilog=EPILOG_DIAGNOSE, formatter_class=argparse.RawDescriptionHelpFormatter)
    _source_arg(d)
    d.add_argument("--layers", type=_positive, metavar="L",
                   help="number of layers (a single pattern is repeated; a program's last section is "
                        "repeated past its end), e.g. --layers 12")
    d.set_defaults(func=cmd_diagnose)
    return parser


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def read_source(text: str) -> ir.Program:
    """A path to a .attn file, or the pattern source itself."""
    path = Path(text)
    if text.endswith(".attn") or (path.suffix and path.exists()):
        if not path.exists():
            raise PatternError(f"no such pattern file: {text}", source=text)
        return load(path)
    return parse_program(text, source="<command line>")


def _settings(args, program: ir.Program) -> tuple[int, int]:
    heads = args.heads or program.heads or 1
    if program.heads is not None and args.heads is not None and args.heads != program.heads:
        raise PatternError(f"--heads {args.heads} disagrees with the source's 'heads = {program.heads}'",
                           source=program.source)
    try:
        block = check_block_size(args.block_size or program.block_size or 64)
    except ValueError as e:
        raise PatternError(f"--block-size: {e}", source=program.source) from None
    for s in program.sections:
        s.pattern.check_heads(heads)
    return heads, block


def cmd_compile(args) -> int:
    from .report import compile_report, format_report, layer_groups, save_layout_png
    from .layout import get_layout

    if args.html and not args.out:
        raise ValueError("--html writes report.html into the output directory; add --out DIR")
    program = read_source(args.source)
    heads, block = _settings(args, program)
    t0 = time.perf_counter()
    rep = compile_report(program, args.seq_len, heads, block, args.head_dim)
    rep["build_seconds"] = round(time.perf_counter() - t0, 3)
    if args.out:
        out = args.out
        out.mkdir(parents=True, exist_ok=True)
        files = []
        for i, (label, pattern) in enumerate(layer_groups(program)):
            name = "layout.npz" if program.single else f"layout-{i}.npz"
            get_layout(pattern, args.seq_len, heads, block).save_npz(out / name)
            files.append(name)
        save_layout_png(program, args.seq_len, heads, block, out / "layout.png")
        files.append("layout.png")
        files += _write_kernels(program, out)
        if args.html:
            files.append(_write_html(program, args, heads, block, out).name)
        rep["files"] = files
        (out / "report.json").write_text(json.dumps(rep, indent=1))
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        print(format_report(rep))
        if args.out:
            print(f"\nwrote {', '.join(rep['files'])} and report.json to {args.out}/")
    return 0


def _write_kernels(program: ir.Program, out: Path) -> list[str]:
    """The generated Triton source of every distinct pattern of the program."""
    try:
        from .backends import triton_backend
    except ImportError:  # pragma: no cover - the Triton backend ships with the package
        return []
    files = []
    seen = {}
    for s in program.sections:
        if s.pattern in seen:
            continue
        name = "kernel.py" if program.single else f"kernel-{len(seen)}.py"
        seen[s.pattern] = name
        try:
            (out / name).write_text(triton_backend.generated_source(s.pattern))
            files.append(name)
        except Exception as e:  # the report is still useful without the kernel
            print(f"warning: could not generate the kernel source: {e}", file=sys.stderr)
    return files


def _write_html(program: ir.Program, args, heads: int, block: int, out: Path) -> Path:
    """report.html, with the receptive-field section."""
    from .analysis import diagnose
    from .html import write_report
    diagnostics = diagnose(program, args.seq_len, num_heads=heads, block_size=block, progress=sys.stderr.isatty())
    return write_report(program, args.seq_len, heads, block, out, diagnostics=diagnostics, head_dim=args.head_dim)


def cmd_diagnose(args) -> int:
    program = read_source(args.source)
    heads, block = _settings(args, program)
    from .analysis import diagnose, format_table, plot_growth

    report = diagnose(program, args.seq_len, num_heads=heads, layers=args.layers, block_size=block,
                      progress=sys.stderr.isatty())
    data = report.to_dict()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "diagnose.json").write_text(json.dumps(data, indent=1))
        plot_growth(report, args.out / "receptive_field.png")
    if args.json:
        print(json.dumps(data, indent=1))
    else:
        print(format_table(report))
        if args.out:
            print(f"\nwrote diagnose.json and receptive_field.png to {args.out}/")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``patterncc`` command; returns the exit status (2 for a bad pattern or input).

    >>> main(["compile", "window(4) - causal", "--seq-len", "64"])
    2
    """
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PatternError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # pragma: no cover - e.g. piped into head
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
