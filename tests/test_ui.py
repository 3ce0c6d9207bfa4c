"""The web page of ``t0s1 serve`` in a real browser: Debian's headless Chromium driven by Playwright,
against the real server on a free loopback port (a tiny random model, and the embedded SmolLM2
for the compare view and its screenshot)."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import httpx
import pytest
import torch
from playwright.sync_api import Page, expect, sync_playwright
from typer.testing import CliRunner

from t0s1 import BudgetForcing, generate
from t0s1.serving.server import create_app, serve_in_background
from t0s1.serving.ui import UIInfo, mount_ui

CHROMIUM = Path(os.environ.get("T0S1_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "images" / "compare.png"
UPDATE_SCREENSHOT = "T0S1_UPDATE_SCREENSHOTS"  # set to 1 to rewrite docs/images/compare.png
DEFAULTS = BudgetForcing(max_thinking_tokens=64, max_answer_tokens=8)
QUESTION = "How many r are in raspberry?"
API_KEY = "ui-test-key"
TIMEOUT_MS = 60_000
# Markup a model could write: as text it is harmless; as HTML it would run or load something.
MARKUP = "<script>window.pwned=1</script><img src=x onerror=window.pwned=2>"

pytestmark = pytest.mark.usefixtures("one_torch_thread")
expect.set_options(timeout=TIMEOUT_MS)  # a reply on a busy CPU can take a while


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"Chromium not found at {CHROMIUM}: `make test` installs it (apt-get install -y chromium), "
                    "or point $T0S1_CHROMIUM at one.")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A fresh browser tab (its own sessionStorage); a JavaScript error fails the test (an HTTP error
    the page expects, such as a 401, is logged by the browser too: those are the tests' business)."""
    context = browser.new_context(viewport={"width": 1280, "height": 820})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: message.type == "error" and not message.text.startswith(
        "Failed to load resource") and errors.append(message.text))
    yield page
    context.close()
    assert not errors, errors


@pytest.fixture(scope="module")
def tiny_server(tiny_model):
    with serve_in_background(create_app(tiny_model, DEFAULTS)) as url:
        yield url


def open_page(page: Page, url: str) -> None:
    page.goto(url)
    expect(page.locator("body")).to_have_attribute("data-ready", "true")


def ask(page: Page, question: str):
    """Type a question, press Enter, wait for the whole reply; the reply's element."""
    replies = page.locator("#messages .reply")
    count = replies.count()
    page.fill("#question", question)
    page.press("#question", "Enter")
    reply = replies.nth(count)
    expect(reply).to_have_attribute("data-state", re.compile("done|error"))
    return reply


def set_control(page: Page, selector: str, value) -> None:
    page.fill(selector, str(value))


def watch_reply_states(page: Page) -> None:
    """Record, in order, every state the next replies pass through and every text they receive."""
    page.evaluate("""() => {
        window.replyEvents = [];
        new MutationObserver((records) => {
            for (const record of records) {
                const target = record.target.nodeType === 1 ? record.target : record.target.parentElement;
                if (record.type === 'attributes') window.replyEvents.push('state:' + target.dataset.state);
                else if (target.closest('.thinking-text')) window.replyEvents.push('thinking');
                else if (target.closest('.answer')) window.replyEvents.push('answer');
            }
        }).observe(document.getElementById('messages'),
                   {subtree: true, childList: true, attributes: true, attributeFilter: ['data-state']});
    }""")


def test_chat_streams_the_thinking_then_the_answer_and_follows_the_controls(tiny_server, tiny_model, page):
    open_page(page, tiny_server)
    expect(page.locator("#model-name")).to_have_text(tiny_model.name)
    expect(page.locator("#format-name")).to_have_text(tiny_model.profile.name)
    expect(page.locator("#format-start")).to_have_text("<|im_start|>think")
    expect(page.locator("#budget")).to_have_value("64")  # the server's defaults
    expect(page.locator("#key-button")).to_be_hidden()  # no key needed

    watch_reply_states(page)
    reply = ask(page, QUESTION)
    [expected] = generate(tiny_model, [QUESTION], DEFAULTS)
    assert not expected.hit_budget and expected.thinking_tokens > 8  # this thinking ends by itself
    assert reply.locator(".thinking-text").text_content() == expected.thinking
    assert reply.locator(".answer").text_content() == expected.answer
    events = page.evaluate("window.replyEvents")
    states = [event for event in events if event.startswith("state:")]
    assert states == ["state:thinking", "state:answering", "state:done"]
    texts = [event for event in events if not event.startswith("state:")]
    assert texts[0] == "thinking" and texts[-1] == "answer"
    assert texts == sorted(texts, key=["thinking", "answer"].index)  # all the thinking came before the answer
    expect(reply.locator(".thinking-label")).to_have_text(f"Thinking: {expected.thinking_tokens} tokens")
    expect(reply.locator(".thinking-stats")).to_have_text(re.compile("ended by itself.*0 Waits injected"))
    expect(reply.locator(".thinking")).not_to_have_attribute("open", "")  # collapsed once the answer came
    expect(reply.locator(".sources")).to_be_hidden()  # no retrieval here
    expect(page.locator("#retrieval-note")).to_be_hidden()

    page.click("#new-chat")
    set_control(page, "#budget", 8)
    short = ask(page, QUESTION)
    expect(short).to_have_attribute("data-thinking-tokens", "8")
    expect(short.locator(".thinking-stats")).to_have_text(re.compile("cut by the budget"))
    assert len(short.locator(".thinking-text").text_content()) < len(expected.thinking)
    assert short.locator(".answer").text_content().startswith("Final Answer:")

    page.click("#new-chat")
    set_control(page, "#budget", "auto")
    set_control(page, "#num-ignore", 1)
    extended = ask(page, QUESTION)
    expect(extended).to_have_attribute("data-num-ignored", "1")
    expect(extended.locator(".thinking-stats")).to_have_text(re.compile("1 Wait injected"))
    thinking = extended.locator(".thinking-text").text_content()
    assert thinking.startswith(expected.thinking) and "Wait" in thinking

    set_control(page, "#budget", "lots")
    page.fill("#question", QUESTION)
    page.press("#question", "Enter")
    expect(page.locator("#controls-error")).to_have_text(re.compile("whole number of tokens or auto"))
    assert page.locator("#messages .reply").count() == 1  # nothing was sent


def test_long_thinking_stays_in_view_long_words_wrap_and_the_default_ignore_string_keeps_its_line_breaks(tiny_model, page,
                                                                                                         monkeypatch):
    """The thinking box scrolls by itself: it stayed at its top while hundreds of lines arrived out
    of view. A pasted unbroken word pushed the whole chat sideways. The one-line ignore_str field
    dropped the line breaks of a server default such as "\\n\\nWait", so the page asked for another."""
    from t0s1.forcing import TorchRunner

    step = TorchRunner.step

    def paced_step(self, slots, tokens):  # a piece of thinking per network write, as a real model sends them
        time.sleep(0.004)
        return step(self, slots, tokens)

    monkeypatch.setattr(TorchRunner, "step", paced_step)
    defaults = BudgetForcing(max_thinking_tokens=600, num_ignore=10, max_answer_tokens=4, ignore_str="\n\nWait")
    with serve_in_background(create_app(tiny_model, defaults)) as url:
        open_page(page, url)
        sent = []
        page.on("request", lambda request: request.method == "POST" and sent.append(json.loads(request.post_data)))
        page.evaluate("""() => {  // the thinking box as the reader saw it after each piece of thinking
            window.thinkingBox = [];
            new MutationObserver(() => {
                const box = document.querySelector('#messages .reply[data-state="thinking"] .thinking-text');
                if (box) window.thinkingBox.push([box.scrollTop, box.scrollHeight, box.clientHeight]);
            }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
        }""")
        ask(page, "x" * 400)
        assert sent[-1]["ignore_str"] == "\n\nWait"
        top, height, shown = page.evaluate("window.thinkingBox")[-1]
        assert height > shown and top + shown >= height - 2  # it overflowed, and its end was in view
        bubble = page.locator("#messages .user").last
        assert bubble.evaluate("b => b.scrollWidth <= b.clientWidth + 1")
        assert page.locator("#messages").evaluate("m => m.scrollWidth <= m.clientWidth + 1")
        set_control(page, "#ignore-str", "Hmm")
        ask(page, QUESTION)
        assert sent[-1]["ignore_str"] == "Hmm"  # one the user typed goes as typed


def test_page_loads_only_its_own_files_and_the_server_errors_show(tiny_server, page):
    requested = []
    page.on("response", lambda response: requested.append((response.url, response.status)))
    response = page.goto(tiny_server)
    assert "script-src 'self'" in response.headers["content-security-policy"]
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    set_control(page, "#budget", 1_000_000)  # longer than the model's context: the server says so
    reply = ask(page, QUESTION)
    expect(reply).to_have_attribute("data-state", "error")
    expect(reply.locator(".reply-error")).to_have_text(re.compile(r"^400: max_thinking_tokens=1000000 .*context"))
    assert requested and all(url.startswith(f"{tiny_server}/") for url, _ in requested), requested
    assert [status for url, status in requested if "/v1/" not in url] == [200] * (len(requested) - 1), requested


def test_no_ui_turns_the_page_off(tiny_model, tiny_server, monkeypatch):
    assert httpx.get(f"{tiny_server}/").status_code == 200
    assert httpx.get(f"{tiny_server}/ui/static/app.js").status_code == 200
    with serve_in_background(create_app(tiny_model, DEFAULTS, ui=False)) as url:
        assert httpx.get(f"{url}/").status_code == 404
        assert httpx.get(f"{url}/ui/info").status_code == 404
        assert httpx.get(f"{url}/health").status_code == 200

    import uvicorn

    import t0s1.models
    from t0s1.cli import app as cli

    served = []
    monkeypatch.setattr(t0s1.models, "load_model", lambda *args, **kwargs: tiny_model)
    def run(server, *args, **kwargs):  # what `t0s1 serve` would serve, without serving it
        served.append(server.config.app)
        server.started = True

    monkeypatch.setattr(uvicorn.Server, "run", run)
    for flags in ([], ["--no-ui"]):
        result = CliRunner().invoke(cli, ["serve", *flags])
        served[-1].state.batcher.stop()  # `t0s1 serve` starts the engine before it listens
        assert result.exit_code == 0, result.output
    paths = [{route.path for route in app.routes} for app in served]
    assert "/" in paths[0] and "/ui/info" in paths[0]
    assert "/" not in paths[1] and "/ui/info" not in paths[1] and "/v1/chat/completions" in paths[1]


@pytest.fixture(scope="module")
def markup_model(tmp_path_factory, tiny_model_dir):
    """The tiny model with one more token, ``MARKUP``, that it writes first when asked ``QUESTION``:
    its output row copies (slightly scaled) the row of the token it would have written."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from t0s1.models import load_model

    base = load_model(str(tiny_model_dir), device="cpu")
    [result] = generate(base, [QUESTION], BudgetForcing(max_thinking_tokens=1, max_answer_tokens=1))
    first = result.thinking_token_ids[0]
    path = tmp_path_factory.mktemp("markup-model")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens([MARKUP])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    markup_id = tokenizer.convert_tokens_to_ids(MARKUP)
    assert markup_id < model.config.vocab_size  # one of the embedding's spare rows
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[markup_id] = head[first] * 1.05
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return load_model(str(path), device="cpu")


def test_markup_in_model_output_is_shown_as_text(markup_model, page):
    with serve_in_background(create_app(markup_model, DEFAULTS)) as url:
        open_page(page, url)
        reply = ask(page, QUESTION)
    shown = reply.locator(".thinking-text").text_content() + reply.locator(".answer").text_content()
    assert MARKUP in shown  # the model wrote the markup and the page shows it as written
    assert page.locator("#messages script, #messages img").count() == 0
    assert page.evaluate("window.pwned") is None


def test_sources_are_shown_when_a_reply_carries_them(tiny_model, page):
    """The retrieval fields of a reply (``sources``: id, title, score, snippet) as the page shows them.
    This server has no retrieval index, so the browser answers the chat request itself."""
    sources = [{"id": "doc-1", "title": "Raspberry <b>facts</b>", "score": 0.87, "snippet": "A raspberry has 3 r."},
               {"id": "doc-2", "title": "Spelling", "score": 0.5, "snippet": MARKUP}]
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
         "sources": sources},
        {"choices": [{"index": 0, "delta": {"reasoning_content": "Count them."}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "3"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
         "budget_forcing": {"thinking_tokens": 3, "answer_tokens": 1, "num_ignored": 0, "hit_budget": False}},
    ]
    body = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
    app = create_app(tiny_model, DEFAULTS, ui=False)
    mount_ui(app, info=UIInfo.describe(tiny_model, DEFAULTS, api_key_required=False, retrieval=True))
    page.route("**/v1/chat/completions",
               lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    with serve_in_background(app) as url:
        open_page(page, url)
        expect(page.locator("#retrieval-note")).to_be_visible()
        reply = ask(page, QUESTION)
    expect(reply.locator(".sources")).to_be_visible()
    items = reply.locator(".source-list li")
    expect(items).to_have_count(2)
    expect(items.nth(0).locator("strong")).to_have_text("Raspberry <b>facts</b>")
    expect(items.nth(0)).to_contain_text("0.870")
    expect(items.nth(1).locator("p")).to_have_text(MARKUP)
    assert reply.locator(".sources b, .sources script, .sources img").count() == 0
    expect(reply.locator(".answer")).to_have_text("3")


def test_the_page_asks_for_the_api_key_once_and_says_when_it_is_wrong(tiny_model, page):
    with serve_in_background(create_app(tiny_model, DEFAULTS, api_key=API_KEY)) as url:
        open_page(page, url)
        dialog = page.locator("#key-dialog")
        expect(dialog).to_be_visible()
        expect(page.locator("#key-message")).to_have_text("This server requires an API key.")
        page.fill("#key-input", "not-the-key")
        page.click("#key-submit")
        expect(page.locator("#key-error")).to_have_text(re.compile("Wrong API key"))
        expect(dialog).to_be_visible()
        page.fill("#key-input", API_KEY)
        page.click("#key-submit")
        expect(dialog).to_be_hidden()
        assert page.evaluate("sessionStorage.getItem('t0s1.apiKey')") == API_KEY
        reply = ask(page, QUESTION)
        expect(reply).to_have_attribute("data-state", "done")

        open_page(page, url)  # asked once: a reload keeps the key for this tab
        expect(dialog).to_be_hidden()
        page.evaluate("sessionStorage.setItem('t0s1.apiKey', 'a-key-that-changed')")
        refused = ask(page, QUESTION)
        expect(refused.locator(".reply-error")).to_have_text(re.compile("Wrong API key"))
        expect(dialog).to_be_visible()
        expect(page.locator("#key-message")).to_have_text(re.compile("wrong API key"))


@pytest.fixture(scope="module")
def smollm2_server(smollm2):
    with serve_in_background(create_app(smollm2, BudgetForcing(max_thinking_tokens=64, max_answer_tokens=24))) as url:
        yield url


def test_compare_runs_two_budgets_side_by_side(smollm2_server, page):
    open_page(page, smollm2_server)
    page.click("#tab-compare")
    expect(page.locator("#compare-view")).to_be_visible()
    page.fill("#compare-question", "What is 12 + 35 * 2?")
    page.fill("#compare-budgets", "8")
    page.click("#compare-send")
    expect(page.locator("#compare-error")).to_have_text(re.compile("2 to 4 thinking budgets"))

    page.fill("#compare-budgets", "8, 64")
    page.click("#compare-send")
    columns = page.locator("#compare-columns .column")
    expect(columns).to_have_count(2)
    long = columns.nth(1)
    # The thinking is on the page while the model is still thinking: it streams.
    page.wait_for_function("""() => {
        const reply = document.querySelectorAll('#compare-columns .reply')[1];
        return reply.dataset.state === 'thinking' && reply.querySelector('.thinking-text').textContent.length > 0
            && reply.querySelector('.answer').textContent === '';
    }""")
    for column in (columns.nth(0), long):
        expect(column.locator(".reply")).to_have_attribute("data-state", "done")
    short = columns.nth(0)
    expect(short.locator(".column-budget")).to_have_text("Budget 8")
    expect(short.locator(".reply")).to_have_attribute("data-thinking-tokens", "8")
    expect(short.locator(".thinking-stats")).to_have_text(re.compile("cut by the budget"))
    long_tokens = int(long.locator(".reply").get_attribute("data-thinking-tokens"))
    assert 8 < long_tokens <= 64
    assert len(long.locator(".thinking-text").text_content()) > len(short.locator(".thinking-text").text_content())
    assert short.locator(".answer").text_content().startswith("Final Answer:")  # the budget forced the answer
    for column in (short, long):
        expect(column.locator(".reply-stats")).to_have_text(re.compile(r"^answer: \d+ tokens? · "))
    if not SCREENSHOT.exists() or os.environ.get(UPDATE_SCREENSHOT) == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        partial = SCREENSHOT.with_suffix(".png.partial")
        partial.write_bytes(page.screenshot())
        partial.replace(SCREENSHOT)


def test_stop_cancels_the_reply_on_the_server(smollm2_server, page):
    open_page(page, smollm2_server)
    set_control(page, "#budget", 400)
    set_control(page, "#num-ignore", 3)  # long enough to be stopped while it thinks
    before = httpx.get(f"{smollm2_server}/health").json()["cancelled"]
    page.fill("#question", "Count from 1 to 100.")
    page.press("#question", "Enter")
    reply = page.locator("#messages .reply").last
    expect(reply).to_have_attribute("data-state", "thinking")
    page.click("#stop")
    expect(reply).to_have_attribute("data-state", "error")
    expect(reply.locator(".reply-error")).to_have_text("Stopped.")
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.locator("#messages .user").last).to_have_class(re.compile("unsent"))
    deadline = time.monotonic() + 30
    while httpx.get(f"{smollm2_server}/health").json()["cancelled"] == before:
        assert time.monotonic() < deadline, "the server went on generating the stopped reply"
        time.sleep(0.2)
