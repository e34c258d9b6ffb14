"""The self-contained HTML report: structure, embedded images, and rendering in headless Chromium.

The Chromium test needs ``/usr/bin/chromium`` (Debian: ``apt-get install -y chromium``) and
is skipped without it.
"""
from __future__ import annotations

import base64
import doctest
import html
import html.parser
import io
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

import patterncc
import patterncc.html as phtml
from patterncc.html import render_report, write_report

CHROMIUM = "/usr/bin/chromium"
PROGRAM = """# a per-layer program
block_size = 32
heads = 4
layers 0..2: window(64) | global([0]) | random(32, seed=1)
layers 2..4: window(64) | global([0]) | dilate(2, heads=2)
"""


class Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.imgs, self.links, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(a)
        for k in ("href", "src"):
            if k in a and tag != "img":
                self.links.append(a[k])

    def handle_data(self, data):
        self.text.append(data)


def parse(text: str) -> Page:
    p = Page()
    p.feed(text)
    return p


def png_size(uri: str) -> tuple[int, int]:
    from matplotlib import image as mimage
    assert uri.startswith("data:image/png;base64,")
    raw = base64.b64decode(uri.split(",", 1)[1])
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    arr = mimage.imread(io.BytesIO(raw), format="png")
    return arr.shape[1], arr.shape[0]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    src = d / "prog.attn"
    src.write_text(PROGRAM)
    path = write_report(patterncc.load(src), 2048, 4, 32, d / "out")
    return path


def test_structure_and_embedded_images(report):
    text = report.read_text()
    assert report.name == "report.html" and text.startswith("<!DOCTYPE html>")
    page = parse(text)
    body = "".join(page.text)
    assert "# a per-layer program" in body  # the source file, comments included
    assert "window(64) | global([0]) | random(32, seed=1)" in body and "dilate(2, heads=[0, 1])" in body
    assert page.tags.count("table") >= 3  # summary + one head table per layer group
    assert "layers 0..2" in body and "layers 2..4" in body and "FLOPs fwd" in body
    # layer 0..2: 4 heads with different random draws; layer 2..4: heads 0-1 dilated, 2-3 not
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", text)
    assert len(captions) == 6 and captions[-2].startswith("heads 0-1") and captions[-1].startswith("heads 2-3")
    assert len(page.imgs) == 7  # 6 layout pictures + the overview
    for img in page.imgs:
        w, h = png_size(img["src"])
        assert w >= 200 and h >= 200 and img.get("alt")
    assert not page.links and "http://" not in text and "https://" not in text  # self-contained


def test_picture_pixels_match_layout(tmp_path):
    op = patterncc.compile("window(16) & causal | global([0])", block_size=16)
    text = render_report(op.program, 256, 1, 16)
    uri = parse(text).imgs[0]["src"]
    from matplotlib import image as mimage
    arr = mimage.imread(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])), format="png")
    scale = arr.shape[0] // 16
    state = op.layout(256, 1).block_matrix(0)
    colors = np.array([phtml._rgb(c) for c in phtml.COLORS]) / 255.0
    got = arr[scale // 2::scale, scale // 2::scale, :3]
    np.testing.assert_allclose(got, colors[state], atol=1 / 255)


def test_diagnostics_section(tmp_path):
    class Fake:
        def to_dict(self):
            return {"seq_len": 512, "layers_to_full_coverage": 3, "per_layer": [{"rf": 1}]}
    text = render_report("window(8)", 512, 1, 16, diagnostics=Fake())
    assert "layers_to_full_coverage" in text and "full diagnostics (JSON)" in text
    assert "No diagnostics" in render_report("window(8)", 512, 1, 16)


def test_receptive_field_plot_embedded(tmp_path):
    analysis = pytest.importorskip("patterncc.analysis")
    if not hasattr(analysis, "plot_growth") or not hasattr(analysis, "diagnose"):
        pytest.skip("patterncc.analysis has no plot_growth / diagnose yet")
    prog = patterncc.parse_program("window(16) | global([0])")
    diag = analysis.diagnose(prog, 512, num_heads=1, layers=3, block_size=16)
    without = parse(render_report(prog, 512, 1, 16))
    page = parse(render_report(prog, 512, 1, 16, diagnostics=diag))
    assert len(page.imgs) == len(without.imgs) + 1
    assert any("receptive" in img["alt"] for img in page.imgs)
    png_size(page.imgs[-1]["src"])


def test_source_is_escaped(tmp_path):
    f = tmp_path / "evil.attn"
    f.write_text("# <script>alert(1)</script> & <b>\nwindow(4)\n")
    text = render_report(f, 128, 1, 16)
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;b&gt;" in text


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="heads = 4, but num_heads=2"):
        write_report(patterncc.parse_program(PROGRAM), 2048, 2, 32, tmp_path)
    with pytest.raises(patterncc.PatternError, match="head 3"):
        write_report("window(4, heads=[3])", 128, 2, 16, tmp_path)
    with pytest.raises(ValueError, match="program must be"):
        write_report(42, 128, 1, 16, tmp_path)


def _chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs /usr/bin/chromium (apt-get install -y chromium)")
def test_renders_in_headless_chromium(report, tmp_path):
    """Chromium loads the page offline and decodes every image (naturalWidth > 0)."""
    page = tmp_path / "page.html"
    probe = ("<script>window.addEventListener('load', () => { const r = Array.from(document.images).map("
             "i => [i.complete, i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width]); "
             "const d = document.createElement('pre'); d.id = 'img-probe'; d.textContent = JSON.stringify(r); "
             "document.body.appendChild(d); });</script>")
    page.write_text(report.read_text().replace("</body>", probe + "</body>"))
    res = _chromium(["--virtual-time-budget=10000", "--dump-dom", page.as_uri()], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    m = re.search(r'<pre id="img-probe">(.*?)</pre>', res.stdout, re.S)
    assert m, "the load handler did not run: " + res.stdout[-500:]
    imgs = json.loads(html.unescape(m.group(1)))
    assert len(imgs) == 7
    for complete, w, h, shown in imgs:
        assert complete and w >= 200 and h >= 200 and shown > 0
    assert "Cost against dense attention" in res.stdout and "<table" in res.stdout

    shot = tmp_path / "shot.png"
    res = _chromium(["--window-size=1200,1600", f"--screenshot={shot}", report.as_uri()], tmp_path)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    from matplotlib import image as mimage
    arr = mimage.imread(shot)
    assert arr.shape[0] >= 1000 and arr[..., :3].std() > 0.05  # not a blank page
    dark = (arr[..., :3].mean(-1) < 0.3).mean()
    assert 0.005 < dark < 0.5  # text and layout pictures drawn


def test_docstring_examples():
    assert doctest.testmod(phtml).failed == 0



def test_cli_compile_html(tmp_path):
    """``patterncc compile ... --out DIR --html`` (skipped until the CLI has the flag)."""
    from patterncc import cli
    try:
        cli.build_parser().parse_args(["compile", "window(4)", "--seq-len", "64", "--html"])
    except SystemExit:
        pytest.skip("the CLI has no --html flag yet")
    rc = cli.main(["compile", "window(16) | global([0])", "--seq-len", "512", "--heads", "2", "--block-size", "16",
                   "--out", str(tmp_path), "--html"])
    assert rc == 0
    page = parse((tmp_path / "report.html").read_text())
    assert len(page.imgs) >= 2
    for img in page.imgs:
        png_size(img["src"])
