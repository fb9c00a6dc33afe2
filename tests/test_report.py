"""The HTML report: self-contained, faithful to the table and the plan, safe with hostile names,
within its size limits, and working in a real browser (headless Chromium)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from esdtool import analyze, load_metrics
from esdtool.plan.directory import allocate
from helpers import run_cli, write_tensors


class Page(HTMLParser):
    """Every element with its attributes, the text of each <script>, and the page's text."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self.text: list[str] = []
        self.rows: list[tuple[str, list[str]]] = []  # (class, cell texts) of the metrics table
        self._in_script = False
        self._cells: list[str] | None = None
        self._row_class = ""
        self.html = html
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.elements.append((tag, attributes))
        if tag == "script":
            self._in_script = True
            self.scripts.append("")
        elif tag == "tr" and (attributes.get("id") or "").startswith("row-"):
            self._row_class, self._cells = attributes.get("class") or "", []
        elif tag == "td" and self._cells is not None:
            self._cells.append("")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False
        elif tag == "tr" and self._cells is not None:
            self.rows.append((self._row_class, self._cells))
            self._cells = None

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data
        else:
            self.text.append(data)
            if self._cells:
                self._cells[-1] += data

    def csp(self) -> str:
        for tag, attrs in self.elements:
            if tag == "meta" and attrs.get("http-equiv") == "Content-Security-Policy":
                return attrs["content"] or ""
        return ""


def assert_self_contained_and_inert(page: Page) -> None:
    """One script (ours, allowed by hash), no fetches, no event-handler attributes."""
    assert len(page.scripts) == 1
    digest = base64.b64encode(hashlib.sha256(page.scripts[0].encode()).digest()).decode()
    csp = page.csp()
    assert "default-src 'none'" in csp and f"script-src 'sha256-{digest}'" in csp
    styles = re.findall(r"<style>(.*?)</style>", page.html, re.S)
    assert len(styles) == 1
    style_digest = base64.b64encode(hashlib.sha256(styles[0].encode()).digest()).decode()
    assert f"style-src 'sha256-{style_digest}'" in csp
    for tag, attrs in page.elements:
        assert tag not in ("link", "iframe", "object", "embed", "base", "form")
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
        if tag == "img":
            assert (attrs["src"] or "").startswith("data:image/svg+xml;base64,")
        if tag == "a":
            assert (attrs["href"] or "").startswith("#")


@pytest.fixture(scope="module")
def minilm_plan(minilm_metrics, tmp_path_factory) -> Path:
    """MiniLM planned with defaults; the directory holds report.html."""
    outdir = tmp_path_factory.mktemp("report") / "plan"
    allocate(minilm_metrics, outdir, task_type="FEATURE_EXTRACTION")
    return outdir


def test_minilm_report_shows_every_row_spectrum_and_planned_rank(minilm_plan, minilm_table):
    html = (minilm_plan / "report.html").read_text()
    assert len(html.encode()) < 5_000_000
    page = Page(html)
    assert_self_contained_and_inert(page)

    ok = minilm_table[minilm_table.status == "ok"]
    ids = [a.get("id") or "" for t, a in page.elements if t == "figure"]
    assert len([i for i in ids if i.startswith("esd-")]) == len(ok) == 39
    assert len(page.rows) == len(minilm_table) == 104
    # 5 overview figures: alpha_ks by depth on HTSR's band, the plan's alpha_median by depth
    # (no band: another scale), spikes by depth, the alpha heatmap, the rank heatmap.
    overview = html[html.index('id="overview"') : html.index('id="spectra"')]
    assert overview.count("<img") == 5
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", unescape(overview), re.S)
    titles = re.findall(r'<img src="data:image/svg\+xml;base64,[^"]*" alt="([^"]*)"', overview)
    assert titles[:2] == ["alpha_ks by layer", "alpha_median by layer"]
    assert "band (2-6)" in captions[0]
    assert "alpha_median" in captions[1] and "not on HTSR's 2-6 scale" in captions[1]
    assert sum("2-6" in c for c in captions) == 2

    # The rows marked selected carry exactly the ranks allocation.csv planned.
    plan = pd.read_csv(minilm_plan / "allocation.csv")
    kept = plan[plan.selected]
    titles = [a.get("title") or "" for t, a in page.elements if t == "th" and "data-type" in a]
    rank_col = next(i for i, title in enumerate(titles) if "LoRA rank planned" in title)
    shown = {cells[0]: int(cells[rank_col]) for css, cells in page.rows if "selected" in css}
    assert shown == {f"{m}.weight": int(r) for m, r in zip(kept.module, kept["rank"], strict=True)}

    # Header facts come from the table's metadata.
    text = " ".join(page.text)
    assert "18 of 36 candidate modules adapted" in text
    cost = (plan.params.sum() / (plan.rows + plan.cols).sum()).round(1)
    assert f"the cost of uniform rank {cost} on all 36 candidates" in text
    assert "39 analysed" in text and "65 skipped" in text


def test_each_spectrum_plot_draws_its_rows_fit_and_thresholds(minilm_table):
    """Read back what the figure draws: the red tail starts at the row's xmin with slope
    -alpha in log-log, and the vertical lines sit at the row's MP edge and TW threshold."""
    from esdtool.render import plots

    row = minilm_table[minilm_table.status == "ok"].iloc[7].to_dict()
    fig = plots.esd_figure(np.asarray(row["eigenvalues"]), row, "alpha_median", 1e-5)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.lines}
    tail = next(v for k, v in lines.items() if k.startswith("power law"))
    x, y = np.asarray(tail.get_xdata()), np.asarray(tail.get_ydata())
    assert x[0] == pytest.approx(row["xmin_median"]) and x[-1] == pytest.approx(row["lambda_max"])
    slope = np.diff(np.log(y)) / np.diff(np.log(x))
    np.testing.assert_allclose(slope, -row["alpha_median"], rtol=1e-9)
    assert lines["MP edge"].get_xdata()[0] == pytest.approx(row["bulk_max"])
    assert lines["spike threshold"].get_xdata()[0] == pytest.approx(row["tw_threshold"])
    assert ax.get_title(loc="left").startswith(f"α = {row['alpha_median']:.2f} (median)")
    assert f"spikes {row['num_spikes']}" in ax.get_title(loc="left")
    assert plots.esd(np.asarray(row["eigenvalues"]), row, "alpha_median").startswith(b"<?xml")


def test_a_crafted_table_cannot_crash_a_plot():
    from esdtool.render import plots

    row = {"M": None, "N": None, "sigma_mp": 0.1, "alpha_median": 2.0, "xmin_median": 1.0,
           "num_spikes": None, "bulk_max": float("inf"), "tw_threshold": float("nan")}  # fmt: skip
    evals = np.array([0.0, 0.5, 1.0, 2.0, float("inf"), float("nan"), 3.0])
    fig = plots.esd_figure(evals, row, "alpha_median")
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert labels and labels[0].startswith("power law")


def test_mp_density_integrates_to_one():
    from scipy.integrate import quad

    from esdtool.render.plots import mp_density

    for M, N, sigma in ((100, 400, 0.3), (64, 64, 1.0), (300, 1000, 2.0)):
        y = M / N
        lo = N * sigma**2 * (1 - y**0.5) ** 2
        hi = N * sigma**2 * (1 + y**0.5) ** 2
        density = lambda v, s=sigma, m=M, n=N: mp_density(np.array([v]), s, m, n)[0]  # noqa: E731
        total, _ = quad(density, lo, hi, limit=200)
        assert total == pytest.approx(1.0, abs=2e-3)


HOSTILE = [
    "model.layers.0.<script>alert(1)</script>.weight",
    "model.layers.0.../../../../tmp/esdtool-pwned.weight",
    'model.layers.1."quoted\' onload=alert(2) x=".weight',
    "model.layers.1.$\\frac{a}{$.weight",  # broken mathtext
    "model.layers.0.<img src=x onerror=alert(3)>.weight",
    "model.layers.1.\x1b[31mred\x07.weight",
    "model.layers.0." + "long" * 1500 + ".weight",
    "<b>outside</b>/../x.weight",
]


def test_hostile_names_come_out_as_text_and_never_as_paths(tmp_path, capsys):
    rng = np.random.default_rng(0)
    tensors = {name: rng.standard_t(3, size=(40, 96)).astype(np.float32) for name in HOSTILE}
    src = tmp_path / "src"
    src.mkdir()
    write_tensors(src / "model.safetensors", tensors, {"note": "<script>alert('meta')</script>"})
    metrics = analyze(src / "model.safetensors", tmp_path / "m.parquet").output
    before = {p for p in tmp_path.parent.rglob("*")}

    code, _, stderr = run_cli(
        ["allocate", metrics, "-o", tmp_path / "plan", "--targets", ".*", "--json"], capsys
    )
    assert code == 0, stderr
    created = {p for p in tmp_path.parent.rglob("*")} - before
    written = ("adapter_config.json", "allocation.csv", "esdtool_plan.json", "report.html")
    assert created == {tmp_path / "plan"} | {tmp_path / "plan" / n for n in written}
    assert not Path("/tmp/esdtool-pwned.weight").exists()

    html = (tmp_path / "plan" / "report.html").read_text()
    page = Page(html)
    assert_self_contained_and_inert(page)
    text = "".join(page.text)
    for name in HOSTILE[:5]:
        assert name in text  # shown, as text
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "\x1b" not in html and "\x07" not in html
    assert "model.layers.1.\\x1b[31mred\\x07.weight" in text
    assert len(page.rows) == len(HOSTILE)


def test_report_cli_and_its_limits(minilm_metrics, tmp_path, capsys):
    out = tmp_path / "r.html"
    code, stdout, stderr = run_cli(
        ["report", minilm_metrics, "-o", out, "--max-plots", "5", "--json"], capsys
    )
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary == {"report": str(out), "spectra_plotted": 5, "spectra_omitted": 34,
                       "bytes": out.stat().st_size}  # fmt: skip
    html = out.read_text()
    assert html.count('<figure id="esd-') == 5 and "34 more not drawn" in html
    assert "LoRA plan" not in html  # an analysis-only report

    code, _, stderr = run_cli(
        ["report", minilm_metrics, "-o", out, "--alpha-column", "num_spikes"], capsys
    )
    assert code == 2 and "--alpha-column must be one of" in stderr and stderr.count("\n") == 1
    code, _, stderr = run_cli(["report", tmp_path / "missing.parquet", "-o", out], capsys)
    assert code == 2 and "missing.parquet" in stderr and stderr.count("\n") == 1


def test_allocate_no_report_writes_none(minilm_metrics, tmp_path, capsys):
    code, _, stderr = run_cli(
        ["allocate", minilm_metrics, "-o", tmp_path / "p", "--no-report", "-q"], capsys
    )
    assert code == 0, stderr
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [
        "adapter_config.json",
        "allocation.csv",
        "esdtool_plan.json",
    ]


def test_report_for_224_matrices_stays_under_25_mb(tmp_path):
    """A 7B-shaped model has 32 blocks x 7 projections = 224 matrices: the whole gallery is
    drawn and the file stays small enough to open and mail."""
    rng = np.random.default_rng(1)
    kinds = {
        "self_attn.q_proj": (64, 64),
        "self_attn.k_proj": (16, 64),
        "self_attn.v_proj": (16, 64),
        "self_attn.o_proj": (64, 64),
        "mlp.gate_proj": (172, 64),
        "mlp.up_proj": (172, 64),
        "mlp.down_proj": (64, 172),
    }
    tensors = {
        f"model.layers.{i}.{kind}.weight": rng.standard_t(4, size=shape).astype(np.float32)
        for i in range(32)
        for kind, shape in kinds.items()
    }
    path = write_tensors(tmp_path / "model.safetensors", tensors)
    metrics = analyze(path, tmp_path / "m.parquet").output
    from esdtool.render.page import report

    result = report(metrics, tmp_path / "report.html")
    assert result.plotted == 224 and result.omitted == 0
    assert result.size_bytes < 25_000_000
    assert result.size_bytes == (tmp_path / "report.html").stat().st_size


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("ESDTOOL_REQUIRE_BROWSER"):
            pytest.fail("ESDTOOL_REQUIRE_BROWSER is set but Chromium is not installed")
        pytest.skip("Chromium is not installed (.ci/run installs Debian's chromium)")
    pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    return path


# Headless Chromium with no network, sync or first-run chatter (the layout tests share them).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


def test_report_works_in_headless_chromium(minilm_plan, tmp_path):
    """Open the real file: no console errors (a CSP violation would be one), sorting and the
    gallery buttons work; the screenshot is kept for a person to look at."""
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    messages: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
        page.on("request", lambda r: None if r.url.startswith(("file:", "data:")) else
                messages.append(f"request: {r.url}"))  # fmt: skip
        page.goto((minilm_plan / "report.html").as_uri())
        page.wait_for_load_state("load")

        # Sort by alpha median, descending after two clicks: numeric order, blanks last.
        header = page.locator("#table th", has_text="α median")
        header.click()
        header.click()
        headers = page.evaluate("[...document.querySelectorAll('#table th')].map(t => t.innerText)")
        column = next(i for i, h in enumerate(headers) if "α median" in h)
        rows = "[...document.querySelectorAll('#table tbody tr')]"
        values = page.evaluate(f"{rows}.map(r => r.cells[{column}].textContent)")
        numbers = [float(v) for v in values if v]
        assert numbers == sorted(numbers, reverse=True) and len(numbers) == 39
        assert all(v == "" for v in values[39:])

        # The first layer's spectra are open on load, the others closed.
        assert page.evaluate("document.querySelectorAll('details.group[open]').length") == 1
        page.click("#expand")
        groups = page.evaluate("document.querySelectorAll('details.group').length")
        assert page.evaluate("document.querySelectorAll('details.group[open]').length") == groups
        # Plots load lazily (each has its size reserved); load them all, then check each decodes.
        page.evaluate(
            "Promise.all([...document.querySelectorAll('#spectra img')]"
            ".map(i => { i.loading = 'eager'; return i.decode(); }))"
        )
        assert page.evaluate(
            "[...document.querySelectorAll('#spectra img')].every(i => i.naturalWidth > 0)"
        )
        page.evaluate("document.querySelector('#spectra').scrollIntoView()")
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot))
        browser.close()
    assert messages == []
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("ESDTOOL_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "report.png")


def test_report_reads_only_what_it_needs(minilm_metrics, tmp_path):
    """A table from an older analysis without some metadata still renders (no KeyError)."""
    table = load_metrics(minilm_metrics)
    table.attrs["esdtool"] = {"source": "<unknown>"}
    from esdtool.render.page import report

    result = report(table, tmp_path / "r.html", max_plots=2)
    html = result.output.read_text()
    assert "<h1>&lt;unknown&gt; <span" in html  # the source, escaped, as the title


@pytest.mark.parametrize("command", ["report", "allocate"])
def test_a_model_instead_of_a_table_says_analyse_first(minilm_dir, tmp_path, capsys, command):
    for source in (minilm_dir, minilm_dir / "model.safetensors"):
        code, _, err = run_cli([command, source, "-o", tmp_path / "out"], capsys)
        assert code == 2 and "not a metrics table" in err, err
        assert "run esdtool analyze first" in err and "Traceback" not in err
        assert "Parquet magic" not in err
    assert not (tmp_path / "out").exists()
