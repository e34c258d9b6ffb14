"""One self-contained HTML page describing a compiled pattern program.

``write_report(program, seq_len, num_heads, block_size, out_dir)`` writes
``out_dir/report.html``: the pattern source, the density / FLOP / memory table of every
layer group and of every group of heads, one block-layout picture per distinct head
layout (identical heads share one; up to 16 per layer group), the overview figure
of ``patterncc compile --out`` and, given a diagnostics report, the receptive-field plot
and table. Every image is an embedded PNG (``data:`` URI) and the style sheet is inline,
so the file can be mailed, attached to an issue or opened offline.

Example:
    >>> import tempfile, patterncc
    >>> from patterncc.html import write_report
    >>> prog = patterncc.parse_program("window(64) | global([0]) | dilate(2, heads=1)")
    >>> path = write_report(prog, seq_len=1024, num_heads=2, block_size=32, out_dir=tempfile.mkdtemp())
    >>> path.name, path.read_text().count("data:image/png;base64,") >= 3
    ('report.html', True)
"""
from __future__ import annotations

import base64
import datetime
import html
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from . import ir
from .layout import get_layout
from .report import _si, block_picture, compile_report, head_ranges, layer_groups, save_layout_png

__all__ = ["write_report", "render_report"]

COLORS = ("#ffffff", "#9ecae1", "#08306b")  # empty, PARTIAL, FULL: as in layout.png
MIN_PICTURE_PX = 256
MAX_PICTURES = 16  # distinct head layouts pictured per layer group

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #1a1a1a; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
.meta { color: #555; }
pre { background: #f6f8fa; padding: .8em 1em; overflow-x: auto; border-radius: 4px; font-size: .9em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .92em; }
th, td { border: 1px solid #d0d7de; padding: .3em .6em; }
th { background: #f0f3f6; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.pictures { display: flex; flex-wrap: wrap; gap: 1.2em; }
figure { margin: 0; } figcaption { font-size: .85em; color: #444; max-width: 300px; word-break: break-word; }
img.layout { width: 256px; height: 256px; image-rendering: pixelated; border: 1px solid #bbb; }
img.figure { max-width: 100%; border: 1px solid #eee; }
.legend span { display: inline-block; width: 1em; height: 1em; border: 1px solid #999; vertical-align: middle; margin: 0 .3em 0 1em; }
.note { color: #8a6d3b; }
"""


def write_report(program, seq_len: int, num_heads: int, block_size: int, out_dir, diagnostics=None, *,
                 head_dim: int = 64, filename: str = "report.html") -> Path:
    """Write the HTML report of ``program`` at (seq_len, num_heads, block_size); return its path.

    ``program`` is a :class:`~patterncc.Program` (or anything :func:`patterncc.compile`
    takes: a pattern expression, a ``.attn`` path, a Pattern). ``diagnostics`` is an
    optional report from ``op.diagnose(...)`` / :func:`patterncc.analysis.diagnose`
    (anything with ``.to_dict()``); its receptive-field plot is drawn with
    ``patterncc.analysis.plot_growth`` when available. ``head_dim`` is used for the FLOP
    and byte counts. ``out_dir`` is created if needed.

    >>> import tempfile, patterncc
    >>> p = write_report("window(16) & causal", 256, 1, 16, tempfile.mkdtemp(), filename="r.html")
    >>> "<table" in p.read_text()
    True
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / filename
    path.write_text(render_report(program, seq_len, num_heads, block_size, diagnostics, head_dim=head_dim),
                    encoding="utf-8")
    return path


def render_report(program, seq_len: int, num_heads: int, block_size: int, diagnostics=None, *,
                  head_dim: int = 64) -> str:
    """The report page as a string (see :func:`write_report`).

    >>> page = render_report("window(8)", 128, 1, 16)
    >>> page.startswith("<!DOCTYPE html>") and "window(8)" in page
    True
    """
    program = _as_program(program)
    if program.heads is not None and program.heads != num_heads:
        raise ValueError(f"the pattern source says heads = {program.heads}, but num_heads={num_heads}")
    for s in program.sections:
        s.pattern.check_heads(num_heads)
    rep = compile_report(program, seq_len, num_heads, block_size, head_dim)
    title = f"patterncc report: {program.source}"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">seq_len = {seq_len:,} &middot; heads = {num_heads} &middot; block size = {block_size} '
        f"&middot; head dim = {head_dim} (for FLOPs and bytes)"
        f"{'' if program.single else f' &middot; {program.num_layers} layers in {len(program.sections)} sections'}</p>",
        "<h2>Pattern source</h2>", _source_section(program),
        "<h2>Cost against dense attention</h2>", _summary_table(rep),
        "<h2>Block layouts</h2>", _layouts_section(program, rep, seq_len, num_heads, block_size),
        "<h2>Receptive field</h2>", _diagnostics_section(diagnostics),
        f'<p class="meta">Generated by patterncc {_version()} on '
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}.</p>",
        "</body></html>",
    ]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------
# sections


def _source_section(program: ir.Program) -> str:
    out = []
    src = Path(program.source) if program.source and not program.source.startswith("<") else None
    if src is not None and src.is_file():
        try:
            text = src.read_text(encoding="utf-8")
            out.append(f"<p>{_e(str(src))}:</p><pre>{_e(text)}</pre><p>Canonical form:</p>")
        except (OSError, UnicodeDecodeError):
            pass
    out.append(f"<pre>{_e(str(program))}</pre>")
    return "\n".join(out)


def _summary_table(rep: dict) -> str:
    head = ["layers", "density", "touched blocks", "block density", "FULL blocks", "max blocks / row",
            "FLOPs fwd", "vs dense", "FLOPs fwd+bwd", "vs dense", "K/V bytes", "vs dense", "empty query blocks"]
    rows = []
    for g in rep["groups"]:
        f, fb, b = g["flops_fwd"], g["flops_fwdbwd"], g["kv_bytes"]
        rows.append([g["layers"], f"{g['density']:.4f}", f"{g['touched_blocks']:,}", f"{g['block_density']:.4f}",
                     f"{g['full_fraction']:.0%}", str(g["blocks_per_row"]["max"]), _si(f["sparse"]),
                     f"{f['sparse'] / f['dense']:.3f}&times;", _si(fb["sparse"]), f"{fb['sparse'] / fb['dense']:.3f}&times;",
                     _si(b["sparse"]) + "B", f"{b['sparse'] / b['dense']:.3f}&times;", str(g["empty_rows"])])
    table = _table(head, rows, raw=True)
    note = ('<p class="meta">density: allowed (query, key) pairs over T&sup2;; blocks: touched (query block, key '
            'block) pairs over all heads; FULL: blocks needing no token mask; FLOPs count the matmuls over touched '
            'blocks (backward &asymp; 2.5&times; forward); K/V bytes are read once per touched block (2-byte '
            'elements).</p>')
    return table + note


def _layouts_section(program: ir.Program, rep: dict, seq_len: int, num_heads: int, block_size: int) -> str:
    out = [f'<p class="legend">One picture per distinct head layout (heads with identical layouts share one; '
           f"heads with different random draws each get their own, up to {MAX_PICTURES}). Rows are query blocks, "
           f"columns key blocks:"
           f'<span style="background:{COLORS[2]}"></span>FULL<span style="background:{COLORS[1]}"></span>'
           f'PARTIAL (token mask evaluated)<span style="background:{COLORS[0]}"></span>untouched</p>']
    for (label, pattern), g in zip(layer_groups(program), rep["groups"]):
        lay = get_layout(pattern, seq_len, num_heads, block_size)
        out.append(f"<h3>{_e(label)}: <code>{_e(str(pattern))}</code></h3>")
        rows = [[head_ranges(h["heads"]), f"{h['density']:.4f}", f"{h['touched_blocks']:,}",
                 f"{h['full_fraction']:.0%}", str(h["max_blocks_per_row"]), f"<code>{_e(h['pattern'])}</code>"]
                for h in g["head_groups"]]
        out.append(_table(["heads", "density", "touched blocks", "FULL", "max blocks / row", "pattern on these heads"],
                          rows, raw=True))
        figs = []
        groups = lay.head_groups()  # heads with identical layouts share a picture
        for heads in groups[:MAX_PICTURES]:
            pic = block_picture(lay, heads[0])
            names = head_ranges(heads)
            pooled = "" if pic.shape[0] == lay.nblocks else f", each pixel {-(-lay.nblocks // pic.shape[0])}&sup2; blocks"
            figs.append(f'<figure><img class="layout" alt="block layout of head{"s" * (len(heads) > 1)} {_e(names)}" '
                        f'src="{_picture_uri(pic)}"><figcaption>head{"s" * (len(heads) > 1)} {_e(names)}: '
                        f"{lay.nblocks}&times;{lay.nblocks} blocks{pooled}</figcaption></figure>")
        if len(groups) > MAX_PICTURES:
            figs.append(f'<p class="meta">{len(groups) - MAX_PICTURES} more distinct head layouts not shown.</p>')
        out.append('<div class="pictures">' + "".join(figs) + "</div>")
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "layout.png"
        save_layout_png(program, seq_len, num_heads, block_size, png)
        out.append(f'<h3>Overview (layout.png)</h3><img class="figure" alt="all block layouts" src="{_file_uri(png)}">')
    return "\n".join(out)


def _diagnostics_section(diagnostics) -> str:
    if diagnostics is None:
        return ('<p class="meta">No diagnostics in this report; run <code>patterncc compile ... --html</code> or '
                "pass <code>diagnostics=op.diagnose(seq_len, layers=L)</code> to include the receptive field.</p>")
    out = []
    try:
        from .analysis import plot_growth
    except ImportError:
        plot_growth = None
    if plot_growth is not None:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                png = Path(tmp) / "receptive_field.png"
                plot_growth(diagnostics, png)
                out.append(f'<img class="figure" alt="receptive field per layer" src="{_file_uri(png)}">')
        except Exception as e:  # the table below is still useful
            out.append(f'<p class="note">The receptive-field plot could not be drawn: {_e(str(e))}</p>')
    else:
        out.append('<p class="note">patterncc.analysis.plot_growth is not available; the plot is left out.</p>')
    try:
        from .analysis import format_table
        out.append(f"<pre>{_e(format_table(diagnostics))}</pre>")
    except Exception:
        pass
    data = diagnostics.to_dict() if hasattr(diagnostics, "to_dict") else dict(diagnostics)
    scalars = [[_e(str(k)), _e(_fmt(v))] for k, v in data.items() if isinstance(v, (int, float, str, bool)) or v is None]
    if scalars:
        out.append(_table(["quantity", "value"], scalars, raw=True))
    out.append("<details><summary>full diagnostics (JSON)</summary>"
               f"<pre>{_e(json.dumps(data, indent=1, default=str))}</pre></details>")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------
# helpers


def _as_program(program) -> ir.Program:
    if isinstance(program, ir.Program):
        return program
    if isinstance(program, (str, os.PathLike, ir.Pattern)):
        from .op import _as_program as convert
        return convert(program)
    raise ValueError(f"program must be a patterncc Program, a pattern source, a .attn path or a Pattern, "
                     f"got {type(program).__name__}")


def _picture_uri(pic: np.ndarray) -> str:
    """A block picture (0/1/2) as a PNG data URI, upscaled by an integer factor for crisp pixels."""
    scale = max(1, -(-MIN_PICTURE_PX // max(pic.shape)))
    rgb = np.array([_rgb(c) for c in COLORS], np.uint8)[np.clip(pic, 0, 2)]
    rgb = rgb.repeat(scale, 0).repeat(scale, 1)
    from matplotlib import image as mimage
    buf = io.BytesIO()
    mimage.imsave(buf, rgb, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _file_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _rgb(hexcolor: str) -> tuple[int, int, int]:
    return tuple(int(hexcolor[i:i + 2], 16) for i in (1, 3, 5))


def _table(head, rows, raw: bool = False) -> str:
    def cell(x, tag):
        text = str(x) if raw else _e(str(x))
        numeric = tag == "td" and _looks_numeric(text)
        return f'<{tag}{" class=num" if numeric else ""}>{text}</{tag}>'
    h = "".join(cell(_e(x), "th") for x in head)
    body = "".join("<tr>" + "".join(cell(x, "td") for x in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _looks_numeric(text: str) -> bool:
    t = text.replace(",", "").replace("&times;", "").replace("%", "").rstrip("kMGTPB")
    try:
        float(t)
        return True
    except ValueError:
        return False


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _version() -> str:
    try:
        from . import __version__
        return __version__
    except ImportError:  # pragma: no cover
        return "?"
