"""The chat page at / in a real headless browser: a message streams back as tokens coloured by the specialist
the gate weighed most, with all weights on hover and a legend.

Needs Debian's chromium (`scripts/setup-browser.sh`) and the `playwright` Python package (never
`playwright install`: it downloads a browser build). Skipped with the reason when either is missing, except in
CI (CI=true), where a missing browser is a failure.
"""

import os
import shutil
import threading
from pathlib import Path

import pytest
from liveserver import MODEL_NAME

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img" / "serve-page.png"


def _need(ok: bool, reason: str) -> None:
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (required in CI: run scripts/setup-browser.sh and install playwright)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    _need(Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: run scripts/setup-browser.sh")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need(False, "the playwright Python package is missing: pip install playwright")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


HELD_AFTER = 3  # decode steps the server runs before the test holds it


def test_page_streams_tokens_coloured_by_specialist(make_server, browser, fused_model, tmp_path, monkeypatch):
    # Streaming is shown without timing: the real generator is held after HELD_AFTER steps, and the page must
    # already show those tokens while its reply is still open. (A timing check failed on fast CPUs, where a whole
    # reply can arrive within one frame.)
    from ultrafuser.serve import engine

    release, held = threading.Event(), threading.Event()
    real_stream = engine.stream

    def held_stream(*args, **kwargs):
        for step, events in enumerate(real_stream(*args, **kwargs)):
            yield events
            if step + 1 == HELD_AFTER:
                held.set()
                release.wait(60)

    monkeypatch.setattr(engine, "stream", held_stream)
    srv = make_server()
    page = browser.new_page(viewport={"width": 1100, "height": 700})
    external = []
    page.on("request", lambda r: None if r.url.startswith(srv.url) else external.append(r.url))
    page.goto(srv.url + "/")
    domains = fused_model.domains
    legend = page.locator("#legend .item")
    legend.first.wait_for()
    assert [legend.nth(i).get_attribute("data-domain") for i in range(legend.count())] == domains
    assert MODEL_NAME in page.locator("#model").inner_text()

    page.fill("#max-tokens", "40")
    page.fill("#input", "Write a function that adds two numbers.")
    try:
        page.keyboard.press("Enter")
        assert held.wait(60), "the server never reached the held step"
        # the first tokens are on the page while the server is held: the reply streams
        # (a span can hold several tokens when one character spans them, hence 1..HELD_AFTER spans)
        page.locator(".msg.assistant .tok").first.wait_for(timeout=30_000)
        partial = page.locator(".msg.assistant").first
        assert partial.get_attribute("data-state") != "done"
        assert 1 <= partial.locator(".tok").count() <= HELD_AFTER
    finally:
        release.set()
    page.locator(".msg.assistant[data-state=done]").wait_for(timeout=60_000)

    reply = page.locator(".msg.assistant").first
    assert "error" not in (reply.get_attribute("class") or "")
    spans = reply.locator(".tok")
    n = spans.count()
    assert n >= 5
    seen = set()
    for i in range(n):
        s = spans.nth(i)
        d = s.get_attribute("data-domain")
        assert d in domains
        seen.add(d)
        title = s.get_attribute("title")
        assert all(dom in title for dom in domains)  # hover shows every specialist's weight
    # the colour is the legend's colour for that domain
    colours = page.evaluate("""() => {
        const sw = {};
        for (const it of document.querySelectorAll('#legend .item'))
            sw[it.dataset.domain] = getComputedStyle(it.querySelector('.swatch')).backgroundColor;
        return [...document.querySelectorAll('.msg.assistant .tok')].map(
            s => [sw[s.dataset.domain], getComputedStyle(s).borderBottomColor]);
    }""")
    assert all(a == b for a, b in colours)
    assert n > HELD_AFTER  # the rest arrived after the release
    assert page.locator(".summary .bar").count() == len(domains)
    assert not external, f"the page fetched from outside the server: {external}"

    shot = tmp_path / "serve-page.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("ULTRAFUSER_UPDATE_DOCS"):  # refresh the README's picture on request only (clean tree)
        DOCS_IMG.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, DOCS_IMG)
    page.close()
