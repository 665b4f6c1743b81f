"""`shardgen inspect --html`: the page, opened in a real headless Chromium (Debian's `chromium`,
driven by Playwright): thumbnails load, error cards show, markup in prompts stays text, and the
page makes no network request."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from pipeline import cli
from pipeline.inspect.output import Output
from pipeline.inspect.report import ERROR_CARDS, contact_sheet
from tests.synthetic_output import SCRIPT_PROMPT

CHROMIUM = "/usr/bin/chromium"  # `make browser` (or .ci/run) installs it
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"


@pytest.fixture(scope="module")
def report(synthetic_output, tmp_path_factory) -> Path:
    """Every ok row on the contact sheet (the script prompts among them), the first error rows as cards."""
    html = tmp_path_factory.mktemp("report") / "report.html"
    assert cli.main(["inspect", synthetic_output.output, "--html", str(html), "--sample", "1000"]) == 0
    return html


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: run `make browser` (apt-get install -y chromium)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser, report):
    """The report, loaded; every request it made and every dialog it opened are recorded."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.requests, page.dialogs = [], []
    page.on("request", lambda r: page.requests.append(r.url))
    page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
    page.goto(report.as_uri(), wait_until="load")
    yield page
    page.close()


def test_thumbnails_load_with_captions(page, synthetic_output):
    thumbs = page.locator("figure.thumb")
    assert thumbs.count() == synthetic_output.ok
    widths = page.eval_on_selector_all("figure.thumb img", "imgs => imgs.map(i => i.complete && i.naturalWidth)")
    assert len(widths) == synthetic_output.ok and all(w == 32 for w in widths)
    caption = thumbs.first.locator("figcaption").inner_text()
    assert re.fullmatch(r"row-00000 ok\n.+\nseed 1000, 4 steps, 32x32", caption), caption


def test_error_cards_show_their_message(page, synthetic_output):
    cards = page.locator(".error-card")
    assert cards.count() == min(ERROR_CARDS, len(synthetic_output.error_ids))
    assert cards.first.is_visible()
    assert cards.first.locator(".id").inner_text() == synthetic_output.error_ids[0]
    assert cards.first.locator(".message").inner_text() == "prompt: empty"
    # Markup in a message is text too.
    assert cards.nth(2).locator(".message").inner_text() == "text_to_image: RuntimeError: boom <b>bold</b>"
    assert page.locator(".error-card b").count() == cards.count()  # only the id is bold


def test_a_script_prompt_shows_as_text(page, synthetic_output, report):
    assert page.evaluate("document.scripts.length") == 0 and page.dialogs == []
    assert page.title().startswith("shardgen report: ")  # the prompt's script would have renamed it
    assert page.locator("img[src='x']").count() == 0
    script_id = synthetic_output.script_ids[0]
    prompt = page.locator("figure.thumb", has=page.locator(f"text={script_id}")).locator(".prompt")
    assert prompt.get_attribute("title") == SCRIPT_PROMPT  # the whole prompt, on hover
    assert prompt.inner_text() == SCRIPT_PROMPT[:59] + "…"
    assert "<script>" not in report.read_text()


def test_no_network_request_and_a_strict_policy(page, report):
    assert page.requests == [report.as_uri()]
    policy = page.locator("meta[http-equiv='Content-Security-Policy']").get_attribute("content")
    assert policy == CSP


def test_summary_and_charts(page, synthetic_output):
    text = page.locator("#status").inner_text()
    assert str(synthetic_output.rows) in text and str(synthetic_output.ok) in text
    assert page.locator("#errors tr").count() == 1 + 3
    for chart in ("#time-chart", "#over-time-chart"):
        assert page.eval_on_selector(chart, "i => i.naturalWidth") > 300
    assert page.locator("#shards tr").count() == 1 + 4


def test_the_contact_sheet_is_a_seeded_sample_across_shards(synthetic_output):
    out = Output(synthetic_output.output)
    first = contact_sheet(out, 12, seed=1)
    assert len(first) == 12 and len({c["shard"] for c in first}) > 1
    assert all(c["status"] == "ok" and c["src"].startswith("data:image/webp;base64,") for c in first)
    assert [c["id"] for c in contact_sheet(out, 12, seed=1)] == [c["id"] for c in first]
    assert [c["id"] for c in contact_sheet(out, 12, seed=2)] != [c["id"] for c in first]


def test_where_narrows_the_report(synthetic_output, tmp_path, browser):
    html = tmp_path / "errors.html"
    assert cli.main(["inspect", synthetic_output.output, "--html", str(html), "--where", "status = 'error'"]) == 0
    page = browser.new_page()
    page.goto(html.as_uri())
    assert page.locator("figure.thumb").count() == 0
    assert page.locator(".error-card").count() == min(ERROR_CARDS, len(synthetic_output.error_ids))
    assert "status = 'error'" in page.locator("body").inner_text()
    page.close()
