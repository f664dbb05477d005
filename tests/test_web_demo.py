"""The Gradio web chat, launched for real on 127.0.0.1: driven with ``gradio_client`` (in-process
model, and pointed at a running API server with ``--api_base``), and once in a headless Chromium
(Debian's, driven by Playwright): the page loads and an answer appears."""
from __future__ import annotations

import inspect
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

from test_serving import API_KEY, no_proxy, running_server

__all__ = ["no_proxy"]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
GREEDY = dict(max_tokens=10, num_beams=1, repetition_penalty=1.005, do_sample=False, temperature=1.0, top_p=0.8,
              seed=-1)


def controls(system: str = "", **overrides: Any) -> List[Any]:
    """The /chat inputs after the message, in the page's order."""
    values = dict(GREEDY, **overrides)
    return [system, *(values[k] for k in ("max_tokens", "num_beams", "repetition_penalty", "do_sample", "temperature",
                                          "top_p", "seed"))]


def launched(backend) -> Iterator[str]:
    from paddlemix.serving.runner import free_port
    from paddlemix.serving.web import build_demo, launch

    demo = launch(build_demo(backend, system=""), "127.0.0.1", free_port(), block=False)
    try:
        yield demo.local_url.rstrip("/")
    finally:
        demo.close()


@pytest.fixture(scope="module")
def page_url(tiny_model_dir, no_proxy) -> Iterator[str]:
    """The demo on the fixture model in this process."""
    from paddlemix.serving.engine import Engine
    from paddlemix.cli_utils import load_model
    from paddlemix.serving.web_backends import EngineBackend

    model, tokenizer = load_model(str(tiny_model_dir), "float32")
    engine = Engine(model, tokenizer).start()
    try:
        yield from launched(EngineBackend(engine, "tiny"))
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    from paddlemix.cli_utils import load_model

    return load_model(str(tiny_model_dir), "float32")


def client_for(url: str):
    from gradio_client import Client

    return Client(url + "/", verbose=False)


def message(text: str, *paths: Path) -> Dict[str, Any]:
    from gradio_client import handle_file

    return {"text": text, "files": [handle_file(str(p)) for p in paths]}


def answers(chatbot: List[Dict[str, Any]]) -> List[str]:
    return ["".join(part["text"] for part in m["content"] if part.get("type") == "text")
            for m in chatbot if m["role"] == "assistant"]


def shown(text: str) -> str:
    """How the Chatbot renders a message: Gradio dedents it (``inspect.cleandoc``)."""
    return inspect.cleandoc(text)


def expected(reference, query: str, images: List[Path], history=None, max_tokens: int = GREEDY["max_tokens"],
             **kwargs: Any) -> str:
    model, tokenizer = reference
    return model.chat(tokenizer, query, image=[str(p) for p in images] or None, history=history, do_sample=False,
                      max_new_tokens=max_tokens, meta_instruction="", **kwargs)[0]


def test_several_images_and_multi_turn_equal_model_chat(page_url, reference, tiny_dir):
    client = client_for(page_url)
    img1, img2 = tiny_dir / "img1.png", tiny_dir / "img2.png"
    chatbot, box = client.predict(message("Compare them.", img1, img2), *controls(), api_name="/chat")
    first = expected(reference, "<ImageHere><ImageHere>Compare them.", [img1, img2])
    assert answers(chatbot) == [shown(first)]
    assert [p["type"] for p in chatbot[0]["content"]] == ["file", "file", "text"]  # both images are shown
    assert box == {"text": "", "files": []}  # the input is cleared
    chatbot, _ = client.predict(message("And the first?"), *controls(), api_name="/chat")
    second = expected(reference, "And the first?", [img1, img2], history=[("<ImageHere><ImageHere>Compare them.", first)])
    assert answers(chatbot) == [shown(first), shown(second)]


def test_answers_stream_in_and_regenerate_and_clear(page_url, reference):
    from paddlemix.serving.web import TYPING

    client = client_for(page_url)
    job = client.submit(message("Hello there"), *controls(max_tokens=12), api_name="/chat")
    final = answers(job.result()[0])
    outputs = [answers(out[0]) for out in job.outputs()]
    partial = [a[-1] for a in outputs if a and a[-1].endswith(TYPING)]
    assert len(partial) >= 3  # the answer grew in steps while it was generated
    assert all(shown(final[-1]).startswith(p[: -len(TYPING)].rstrip()) for p in partial)
    assert final == [shown(expected(reference, "Hello there", [], max_tokens=12))]
    again = client.predict(*controls(max_tokens=12), api_name="/regenerate")
    assert answers(again) == final  # greedy: the same answer again, still one turn
    cleared = client.predict(api_name="/clear")
    assert cleared[0] == []
    with pytest.raises(Exception, match="Nothing to regenerate"):
        client.predict(*controls(), api_name="/regenerate")


def test_beams_override_the_sampling_box_as_the_slider_says(page_url, reference):
    client = client_for(page_url)  # "Beam size (greedy only)": beams > 1 search greedily, box ticked or not
    chatbot, _ = client.predict(message("Hi"), *controls(max_tokens=6, num_beams=3, do_sample=True), api_name="/chat")
    assert answers(chatbot) == [shown(expected(reference, "Hi", [], max_tokens=6, num_beams=3))]


def test_refusals_are_shown_and_the_turn_is_not_kept(page_url):
    client = client_for(page_url)
    with pytest.raises(Exception, match="Type a question"):
        client.predict(message(""), *controls(), api_name="/chat")
    chatbot, _ = client.predict(message("Hi"), *controls(max_tokens=3), api_name="/chat")
    assert [m["role"] for m in chatbot] == ["user", "assistant"]  # the refused turn left nothing behind


def test_api_base_mode_talks_to_a_running_server(tiny_model_dir, tiny_dir, reference, no_proxy):
    from paddlemix.serving.web_backends import ChatError, OpenAIBackend

    with running_server(tiny_model_dir, tiny_dir) as server:
        backend = OpenAIBackend(server["url"] + "/v1", API_KEY)
        assert backend.model_name == server["name"]
        for url in launched(backend):
            client = client_for(url)
            img1 = tiny_dir / "img1.png"
            chatbot, _ = client.predict(message("What is it?", img1), *controls(), api_name="/chat")
            assert answers(chatbot) == [shown(expected(reference, "<ImageHere>What is it?", [img1]))]
            with pytest.raises(Exception, match="Type a question"):  # the page's own refusal, in this mode too
                client.predict(message(""), *controls(), api_name="/chat")
        with pytest.raises(ChatError, match="beam search"):  # the server's 400, as the page shows it
            list(backend.stream([{"role": "user", "content": "Hi"}], {"num_beams": 2, "do_sample": True}))
    with pytest.raises(ValueError, match="cannot list the models"):
        OpenAIBackend(server["url"] + "/v1", API_KEY)  # the server is gone


def browser_answer(url: str, question: str, screenshot: Path, image: Optional[Path] = None) -> str:
    """Open the page in headless Chromium, ask ``question`` (with ``image``), wait for the answer to
    finish, save a screenshot; returns the answer's text as the page shows it."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(url + "/", wait_until="domcontentloaded")
            box = page.wait_for_selector("#chat-input textarea", timeout=60_000)
            if image is not None:
                page.set_input_files("#chat-input input[type=file]", str(image))
                page.wait_for_selector("#chat-input img", timeout=30_000)
            box.fill(question)
            box.press("Enter")
            bot = page.wait_for_selector("#chatbot [data-testid=bot]", timeout=60_000)
            page.wait_for_function("() => { const b = document.querySelector('#chatbot [data-testid=bot]');"
                                   " return b && b.innerText.trim() && !b.innerText.includes('\u258c'); }",
                                   timeout=60_000)
            page.screenshot(path=str(screenshot))
            return bot.inner_text()
        finally:
            browser.close()


def test_page_in_a_real_browser(page_url, tmp_path):
    if not os.path.exists(CHROMIUM):
        if os.environ.get("IXC2_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} is missing but IXC2_REQUIRE_BROWSER is set (apt-get install chromium)")
        pytest.skip(f"{CHROMIUM} is not installed (Debian package chromium)")
    shot = tmp_path / "web_demo.png"
    text = browser_answer(page_url, "Hello there", shot)
    assert text.strip()
    assert shot.stat().st_size > 10_000
    if os.environ.get("IXC2_WEB_DEMO_SCREENSHOT"):  # keep it (the README's is made on the quickstart model)
        shutil.copy(shot, os.environ["IXC2_WEB_DEMO_SCREENSHOT"])
