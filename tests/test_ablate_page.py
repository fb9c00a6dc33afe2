"""ablation.html in a real browser (headless Chromium) at a phone's width (390 px) and a
laptop's (1280 px): no sideways scroll outside the tables' own boxes, nothing fetched, nothing
logged, text from the results escaped; and its numbers are the summary's. Built from made-up
results (no training), so the page is tested on every shape of outcome at once: a failed run
with markup in its reason, an arm with one seed, an arm with every run failed."""

from __future__ import annotations

import pytest
from test_report import CHROMIUM_ARGS, _chromium

from esdtool.ablation.page import render
from esdtool.ablation.summary import summarise

ARMS = ("uniform", "esd", "shuffled", "lonely", "broken")


def _rows() -> list[dict]:
    rows = []
    for arm, shift in (("uniform", 0.0), ("esd", -0.05), ("shuffled", 0.02)):
        for lr in (1e-4, 3e-4):
            for seed in (1, 2, 3):
                params = 20_000 if (arm, seed) == ("esd", 2) else 17_952  # one off the budget
                rows.append({"arm": arm, "lr": lr, "seed": seed, "status": "ok", "reason": None,
                             "eval_loss": 2.0 + shift + 0.01 * seed + (lr > 2e-4) * 0.1,
                             "test_loss": None,
                             "trainable_params": params})  # fmt: skip
    rows.append({"arm": "lonely", "lr": 1e-4, "seed": 1, "status": "ok", "reason": None,
                 "eval_loss": 1.9, "test_loss": None})  # fmt: skip
    rows.append({"arm": "broken", "lr": 1e-4, "seed": 1, "status": "failed",
                 "reason": "<script>alert(1)</script> the training loss is nan at step 3",
                 "eval_loss": None, "test_loss": None})  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    rows = _rows()
    design = {
        "inputs": {"model": "<b>org/model</b>", "data": "train.jsonl", "eval_data": "eval.jsonl"},
        "settings": {"seeds": 3, "lrs": [1e-4, 3e-4]},
        "budget": 17_920,
        "arms": {a: {"how": f"how {a} <i>was made</i>", "peft_params": 17_952} for a in ARMS},
    }
    summaries = summarise(rows, ARMS, has_test=False)
    html = render(design, rows, summaries, total_runs=len(rows))
    path = tmp_path_factory.mktemp("ablation-page") / "ablation.html"
    path.write_text(html, encoding="utf-8")
    return path, html, summaries


def test_the_page_says_what_the_summary_says(page):
    _, html, summaries = page
    by_arm = {s.arm: s for s in summaries}
    assert by_arm["esd"].lr == 1e-4 and by_arm["esd"].diff.mean == pytest.approx(-0.05)
    assert "esd vs uniform: better than uniform" in html
    assert "lonely vs uniform: one paired seed, no interval" in html
    assert "optimistic" in html  # no test data
    # every arm chose 1e-4, the grid's smallest: said, since its best may lie below
    assert "uniform: its best learning rate is the grid&#39;s smallest (0.0001)" in html
    assert "2 run(s) trained more than 1% off the budget" in html  # esd seed 2, at both rates
    assert "esd/lr0.0001/seed2</code> 20,000 (+11.6%)" in html
    assert "&lt;script&gt;" in html and "<script" not in html
    assert "&lt;b&gt;org/model&lt;/b&gt;" in html and "<i>" not in html


@pytest.mark.parametrize("width", [390, 1280])
def test_the_page_fits_any_width_and_fetches_nothing(page, width):
    path, _, _ = page
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    messages: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": width, "height": 800})
        tab = context.new_page()
        tab.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
        tab.on("request", lambda r: None if r.url.startswith(("file:", "data:")) else
               messages.append(f"request: {r.url}"))  # fmt: skip
        tab.goto(path.as_uri())
        tab.wait_for_load_state("load")
        overflow = tab.evaluate("""() => [...document.querySelectorAll('body *')].filter(e => {
            const r = e.getBoundingClientRect();
            return r.width > 0 && r.right > window.innerWidth + 0.5 && !e.closest('.scroll');
        }).map(e => e.tagName)""")
        wide = tab.evaluate("document.documentElement.scrollWidth")
        images = tab.evaluate("[...document.images].map(i => i.naturalWidth > 0)")
        browser.close()
    assert overflow == [] and wide <= width
    assert images and all(images)
    assert messages == []
