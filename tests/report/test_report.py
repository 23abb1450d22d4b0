"""report.html at the real target's shape: a fabricated development output of pythia-70m-deduped's 19 sites x
K=10 checkpoints (tests/report/synthetic.py: planted numbers, sites handed over shuffled), rendered, opened in
headless Chromium and read back from the DOM."""

from __future__ import annotations

import base64
import re
import struct
from html.parser import HTMLParser

import pytest

from sfcd.report.html import MAX_WIDTH, THUMB_WIDTH, render
from sfcd.report.plots import layer_order
from tests.conftest import run_chromium
from tests.report.synthetic import pythia_sites

TITLE = "sfcd study: <i>pythia</i> & co"


class _Page(HTMLParser):
    """The parts of the DOM the tests read: heatmap tables (header and cell texts per row), the <details>
    elements (attributes) and the images' data."""

    def __init__(self):
        super().__init__()
        self.heat: dict[str, dict] = {}
        self.details: list[dict] = []
        self.images: list[dict] = []
        self._table = None
        self._cell = None
        self._row = None
        self._in_head = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and "data-metric" in a:
            self._table = self.heat.setdefault(a["data-metric"], {"cols": [], "rows": {}})
        elif tag == "details":
            self.details.append(a)
        elif tag == "img":
            self.images.append(a)
        elif self._table is not None:
            if tag == "thead":
                self._in_head = True
            elif tag == "tr" and "data-row" in a:
                self._row = self._table["rows"].setdefault(a["data-row"], [])
            elif tag in ("td", "th"):
                self._cell = []

    def handle_endtag(self, tag):
        if self._table is None:
            return
        if tag == "table":
            self._table = None
        elif tag == "thead":
            self._in_head = False
        elif tag in ("td", "th") and self._cell is not None:
            text = "".join(self._cell).strip()
            if self._in_head:
                self._table["cols"].append(text)
            elif tag == "td" and self._row is not None:
                self._row.append(text)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="module")
def report(tmp_path_factory, chromium):
    from tests.report.synthetic import fabricate

    root = tmp_path_factory.mktemp("report19")
    dev, plots, links = fabricate(root, k=10, tasks=("nounpp", "rc"), draw=False)
    page = render(root, TITLE, plots, dev, links)
    dom = run_chromium(chromium, page.as_uri())
    parsed = _Page()
    parsed.feed(dom)
    return {"root": root, "dev": dev, "plots": plots, "page": page, "dom": dom, "parsed": parsed}


def test_fabricated_study_has_the_real_targets_shape(report):
    dev = report["dev"]
    assert len(dev["sites"]) == 19 and len(dev["steps"]) == 10
    assert list(dev["sites"]) != pythia_sites()  # handed over shuffled: the order is the report's to make


def test_one_collapsed_section_per_site_in_layer_order(report):
    # bug caught: sites in the analysis' (dict) order, a site missing or twice, sections rendered open
    sections = [d for d in report["parsed"].details if d.get("class") == "site"]
    expected = ["embed"] + [f"{k}.{layer}" for layer in range(6) for k in ("attn", "mlp", "resid")]
    assert [d["id"] for d in sections] == [f"site-{s}" for s in expected]
    assert not any("open" in d for d in sections)
    # the summary is on top: every heatmap comes before the first site section
    dom = report["dom"]
    assert dom.index('data-metric="births"') < dom.index('id="site-embed"')


@pytest.mark.parametrize("metric", ["ce_loss_score", "fve", "shared_with_final", "births", "deaths"])
def test_summary_heatmap_cells_are_the_planted_numbers(report, metric):
    # bug caught: a cell in the wrong row or column (site/step transposed or shifted), the wrong metric, a
    # value dropped; the expected text is formatted here from the planted rows, not by the report's code
    dev = report["dev"]
    table = report["parsed"].heat[metric]
    steps = dev["steps"]
    assert table["cols"][1 : 1 + len(steps)] == [str(s) for s in steps]
    assert list(table["rows"]) == pythia_sites()
    planted = {(r["site"], r["step"]): r for r in dev["sae_rows"]}
    for site, cells in table["rows"].items():
        for step, text in zip(steps, cells, strict=False):
            v = planted[(site, step)][metric]
            want = "–" if v is None else (str(v) if isinstance(v, int) else f"{v:.3f}")
            assert text == want, (metric, site, step)
        if metric == "shared_with_final":  # the last column: the seed baseline
            assert table["cols"][-1] == "seed" and cells[-1] == f"{planted[(site, steps[-1])]['seed_baseline']:.3f}"
        else:
            assert len(cells) == len(steps)


def test_circuit_and_crosscoder_heatmaps_are_the_planted_numbers(report):
    dev, heat = report["dev"], report["parsed"].heat
    table = heat["circuit:jaccard_final"]
    assert list(table["rows"]) == ["nounpp", "rc"]
    for task, cells in table["rows"].items():
        assert cells == [f"{r['jaccard_final']:.3f}" for r in dev["circuits"][task]]
    table = heat["crosscoder:present"]
    assert list(table["rows"]) == [f"resid.{layer}" for layer in range(6)]
    for site, cells in table["rows"].items():
        assert cells == [f"{r['present']:.3f}" for r in dev["crosscoder"]["sites"][site]["per_checkpoint"]]


def _png_header(img: dict) -> tuple[int, int, int]:
    """An embedded PNG's width, height and colour type (3: palette), from its IHDR chunk."""
    raw = base64.b64decode(img["src"].split(",", 1)[1])
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    width, height = struct.unpack(">II", raw[16:24])
    return width, height, raw[25]


def test_the_page_stays_light(report):
    # bugs caught: pictures embedded at full size (the 1330 x 2160 circuit pictures, 1440-pixel plots) or as
    # RGB, the site x checkpoint plots embedded beside their heatmaps, a per-feature table
    images = {img["alt"]: _png_header(img) for img in report["parsed"].images}
    expected = {"training", "lineage", "circuits", "crosscoder circuits", "nounpp", "rc"}
    expected |= {f"crosscoder_latents:resid.{layer}" for layer in range(6)}
    assert set(images) == expected and len(report["parsed"].images) == len(expected)
    assert all(w <= MAX_WIDTH for w, _, _ in images.values())
    for task in ("nounpp", "rc"):  # the circuit pictures: shrunk in proportion, as a palette
        w, h, colour_type = images[task]
        assert w == THUMB_WIDTH and abs(h - 2160 * THUMB_WIDTH / 1330) <= 1 and colour_type == 3
    # table cells grow with sites x checkpoints (heatmaps, per-site tables), not with features (32,768 a site)
    assert report["page"].read_text().count("<td") < 30 * 19 * 10


def test_all_text_is_escaped(report):
    # bug caught: the title (or any text) written raw: an element would appear in the DOM
    dom = report["dom"]
    assert "<i>" not in dom and "sfcd study: &lt;i&gt;pythia&lt;/i&gt; &amp; co</h1>" in dom


def test_layer_order_is_the_forward_order_of_sites():
    # independent: sfcd.models.sites.Site.order (the forward pass) for every site name of a 12-layer model
    from sfcd.models.sites import parse_site

    names = ["embed"] + [f"{k}.{layer}" for layer in range(12) for k in ("resid", "mlp", "mlp_act", "attn")]
    assert layer_order(reversed(names)) == sorted(names, key=lambda n: parse_site(n).order)
    assert layer_order(["zz", "resid.1@k=16", "resid.10", "embed", "resid.2"]) == [
        "embed",
        "resid.1@k=16",
        "resid.2",
        "resid.10",
        "zz",
    ]


def test_a_report_without_circuits_or_crosscoders_renders(tmp_path):
    # bug caught: sections that assume circuits or crosscoders exist (a study with tasks=[] or no crosscoder)
    from tests.report.synthetic import fabricate

    dev, plots, links = fabricate(tmp_path, k=3, sites=["embed", "resid.0"], tasks=(), crosscoder=False, draw=False)
    dev["identical_checkpoints"] = [[0, 16]]  # as run_study finds Pythia's step0 and step1
    text = render(tmp_path, "t", plots, dev, links).read_text()
    assert 'id="site-embed"' in text and "Crosscoders" not in text and "Circuits through" not in text
    assert re.search(r'data-metric="fve"', text)
    assert "Checkpoints 0, 16 have identical weights" in text


def test_heatmap_colours_bin_the_values_over_the_scale():
    # bugs caught: colours over the wrong range (a count table not starting at 0, a fixed scale not clipped),
    # a missing value coloured as a number; expected bins: ten equal parts of the scale
    from sfcd.report.html import heatmap

    def classes(values, fixed=None):
        text = heatmap("m", "c", ["a", "b"], [1, 2, 3], values, "", fixed)
        return re.findall(r'<td class="(\w+)">([^<]*)</td>', text)

    got = classes({("a", 1): 0.0, ("a", 2): 0.55, ("a", 3): 1.0, ("b", 1): 1.7, ("b", 2): -0.2}, (0.0, 1.0))
    assert got == [("h0", "0.000"), ("h5", "0.550"), ("h9", "1.000"), ("h9", "1.700"), ("h0", "-0.200"), ("na", "–")]
    got = classes({("a", 1): 90, ("a", 2): 100, ("a", 3): 45, ("b", 1): 9, ("b", 2): 20, ("b", 3): None})
    assert got == [("h9", "90"), ("h9", "100"), ("h4", "45"), ("h0", "9"), ("h2", "20"), ("na", "–")]
