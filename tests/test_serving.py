"""The OpenAI-compatible server on the tiny fixture, driven by the official ``openai`` client
against uvicorn on 127.0.0.1: answers equal ``model.chat``, streaming, images of every kind,
multi-turn, usage, and every refusal as an OpenAI-shaped 4xx."""
from __future__ import annotations

import base64
import contextlib
import http.server
import inspect
import json
import logging
import struct
import zlib
from pathlib import Path
from typing import Any, Dict, Iterator, List

import httpx
import openai
import pytest

from conftest import LOOPBACK_NO_PROXY, loopback_server

API_KEY = "test-key"
MAX_IMAGES = 3
MAX_BODY_BYTES = 256 * 1024  # the test server's request limit (the fixture's images are a few kB)
QUESTION = "What shape is in the middle?"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (no pixel data: a size check must refuse it
    from the header alone)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def image_handler(tiny_dir: Path):
    """Loopback files: a real image, a web page, bytes that are no image, a header claiming 9000 x 9000 (81 M pixels)."""
    files = {"/img1.png": ("image/png", (tiny_dir / "img1.png").read_bytes()),
             "/img2.png": ("image/png", (tiny_dir / "img2.png").read_bytes()),
             "/page.html": ("text/html", b"<html>not an image</html>"),
             "/noise.bin": ("application/octet-stream", bytes(range(256)) * 8),
             "/huge.png": ("image/png", png_header(9000, 9000))}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path == "/redirect-malformed":
                self.send_response(302)
                self.send_header("Location", "http://[::1/img1.png")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.path not in files:
                self.send_error(404)
                return
            kind, body = files[self.path]
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@contextlib.contextmanager
def running_server(model_dir: Path, media_dir: Path, **kwargs: Any) -> Iterator[Dict[str, Any]]:
    """The server on the fixture checkpoint, in-process on a free loopback port."""
    from paddlemix.serving.media import MediaLoader
    from paddlemix.cli_utils import load_model
    from paddlemix.serving.runner import ServerThread, build_server, default_model_name

    model, tokenizer = load_model(str(model_dir), "float32")
    options = dict(api_keys=[API_KEY], max_images=MAX_IMAGES, max_batch_size=8, max_queue=8, batch_wait=0.05,
                   max_body_bytes=MAX_BODY_BYTES)
    options.update(kwargs)
    name = default_model_name(str(model_dir))
    app, engine = build_server(model, tokenizer, name, media=MediaLoader(str(media_dir), allow_private_urls=True),
                               **options)
    try:
        with ServerThread(app) as url:
            yield {"url": url, "engine": engine, "name": name, "model": model, "tokenizer": tokenizer}
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def no_proxy() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:  # loopback traffic must not go through a proxy
        patch.setenv("NO_PROXY", LOOPBACK_NO_PROXY)
        patch.setenv("no_proxy", LOOPBACK_NO_PROXY)
        yield


@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny_dir, no_proxy) -> Iterator[Dict[str, Any]]:
    with running_server(tiny_model_dir, tiny_dir) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """A second copy of the fixture model for the expected answers (the server's is busy serving)."""
    from paddlemix.cli_utils import load_model

    return load_model(str(tiny_model_dir), "float32")


@pytest.fixture(scope="module")
def images(tiny_dir, no_proxy) -> Iterator[Dict[str, str]]:
    with loopback_server(image_handler(tiny_dir)) as base:
        yield {"base": base, "img1": str(tiny_dir / "img1.png"), "img2": str(tiny_dir / "img2.png")}


def data_url(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def image_part(url: str) -> Dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def text_part(text: str) -> Dict[str, Any]:
    return {"type": "text", "text": text}


def ask(client, server, messages, **kwargs):
    return client.chat.completions.create(model=server["name"], messages=messages, **kwargs)


def expected(reference, query, image=None, history=None, max_new_tokens=12, **kwargs) -> str:
    model, tokenizer = reference
    return model.chat(tokenizer, query, image=image, history=history, do_sample=False, max_new_tokens=max_new_tokens,
                      **kwargs)[0]


def streamed(client, server, messages, **kwargs):
    """(content deltas joined, the chunks) of a streamed request."""
    chunks = list(ask(client, server, messages, stream=True, **kwargs))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


# --- answers -------------------------------------------------------------------------------------
def test_health_and_models(server, client):
    assert httpx.get(server["url"] + "/health").json() == {"status": "ok"}  # no key needed
    assert [m.id for m in client.models.list().data] == [server["name"]] == [Path(server["name"]).name]
    assert client.models.retrieve(server["name"]).id == server["name"]


def test_defaults_are_the_official_chat_defaults(reference):
    from paddlemix.models.internlm_xcomposer2.processor import DEFAULT_META_INSTRUCTION
    from paddlemix.serving.protocol import parse_chat_request

    chat = inspect.signature(reference[0].chat).parameters
    request = parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "Hi"}]})
    s = request.sampling
    assert (s.max_tokens, s.do_sample, s.temperature, s.top_p, s.top_k, s.repetition_penalty) == tuple(
        chat[name].default for name in ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k",
                                        "repetition_penalty"))
    assert (s.max_tokens, s.do_sample, s.temperature, s.top_p, s.top_k, s.repetition_penalty) == (
        1024, True, 1.0, 0.8, None, 1.005)
    assert request.conversation.meta_instruction == DEFAULT_META_INSTRUCTION == chat["meta_instruction"].default
    greedy = parse_chat_request({"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "Hi"}]})
    assert greedy.sampling.do_sample is False


def test_image_then_text_is_exactly_the_chat_query(server, client, reference, images):
    messages = [{"role": "user", "content": [image_part(data_url(images["img1"])), text_part(QUESTION)]}]
    reply = ask(client, server, messages, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == expected(reference, "<ImageHere>" + QUESTION, image=[images["img1"]])
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    model, tokenizer = reference
    from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2Processor

    layout = InternLMXComposer2Processor.from_config(tokenizer, model.config).chat_layout("<ImageHere>" + QUESTION,
                                                                                          num_images=1)
    assert reply.usage.prompt_tokens == len(layout) > model.config.num_image_tokens  # the image's embeddings count
    assert reply.usage.completion_tokens == 12 or reply.choices[0].finish_reason == "stop"
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_text_only_and_system_message(server, client, reference):
    plain = ask(client, server, [{"role": "user", "content": "Hello there"}], max_tokens=10, temperature=0)
    assert plain.choices[0].message.content == expected(reference, "Hello there", max_new_tokens=10)
    for system in ("", "You are terse."):
        reply = ask(client, server, [{"role": "system", "content": system}, {"role": "user", "content": "Hello there"}],
                    max_tokens=10, temperature=0)
        assert reply.choices[0].message.content == expected(reference, "Hello there", max_new_tokens=10,
                                                            meta_instruction=system)
    assert reply.choices[0].message.content != plain.choices[0].message.content  # the system prompt matters


def test_stream_equals_non_stream_with_usage(server, client, images):
    messages = [{"role": "user", "content": [image_part(data_url(images["img2"])), text_part(QUESTION)]}]
    whole = ask(client, server, messages, max_tokens=14, temperature=0)
    text, chunks = streamed(client, server, messages, max_tokens=14, temperature=0,
                            stream_options={"include_usage": True})
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1
    text, chunks = streamed(client, server, messages, max_tokens=14, temperature=0)  # no usage chunk unless asked
    assert text == whole.choices[0].message.content and chunks[-1].choices[0].finish_reason


def test_sse_framing(server, images):
    body = {"model": server["name"], "stream": True, "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "user", "content": "Hi"}]}
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]" and lines.count("data: [DONE]") == 1
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and len(c["choices"]) == 1 for c in chunks)
    assert sum(c["choices"][0]["finish_reason"] is not None for c in chunks) == 1


def test_loopback_http_image_equals_data_url(server, client, images):
    answers = [ask(client, server, [{"role": "user", "content": [image_part(url), text_part(QUESTION)]}],
                   max_tokens=10, temperature=0).choices[0].message.content
               for url in (images["base"] + "/img1.png", data_url(images["img1"]), images["img1"],
                           "file://" + images["img1"])]
    assert len(set(answers)) == 1  # http, data: and (allowed) local path give the same image


def test_images_go_where_their_parts_stand(server, client, reference, images):
    a, b = data_url(images["img1"]), data_url(images["img2"])
    content = [text_part("First "), image_part(a), text_part(" then "), image_part(b), text_part("?")]
    reply = ask(client, server, [{"role": "user", "content": content}], max_tokens=10, temperature=0)
    assert reply.choices[0].message.content == expected(reference, "First <ImageHere> then <ImageHere>?",
                                                        image=[images["img1"], images["img2"]], max_new_tokens=10)
    swapped = ask(client, server, [{"role": "user", "content": [content[0], content[3], content[2], content[1],
                                                                 content[4]]}], max_tokens=10, temperature=0)
    assert swapped.choices[0].message.content == expected(reference, "First <ImageHere> then <ImageHere>?",
                                                          image=[images["img2"], images["img1"]], max_new_tokens=10)


def test_multi_turn_keeps_earlier_images(server, client, reference, images):
    first_q = [image_part(data_url(images["img1"])), text_part("Describe it.")]
    first = ask(client, server, [{"role": "user", "content": first_q}], max_tokens=8, temperature=0)
    answer = first.choices[0].message.content
    messages = [{"role": "user", "content": first_q}, {"role": "assistant", "content": answer},
                {"role": "user", "content": [text_part("And this one? "), image_part(images["base"] + "/img2.png")]}]
    reply = ask(client, server, messages, max_tokens=8, temperature=0)
    history = [("<ImageHere>Describe it.", answer)]
    assert reply.choices[0].message.content == expected(reference, "And this one? <ImageHere>", history=history,
                                                        image=[images["img1"], images["img2"]], max_new_tokens=8)
    text, _ = streamed(client, server, messages, max_tokens=8, temperature=0)
    assert text == reply.choices[0].message.content


def test_seeded_sampling_equals_chat_with_seed(server, client, reference):
    messages = [{"role": "user", "content": "Tell me something."}]
    model, tokenizer = reference
    want = model.chat(tokenizer, "Tell me something.", max_new_tokens=10, temperature=0.9, seed=11)[0]
    got = [ask(client, server, messages, max_tokens=10, temperature=0.9, seed=11).choices[0].message.content
           for _ in range(2)]
    assert got == [want, want]
    other = ask(client, server, messages, max_tokens=10, temperature=0.9, seed=12).choices[0].message.content
    assert other != want


def test_extra_body_parameters_reach_generation(server, client, reference):
    messages = [{"role": "user", "content": "Count to ten."}]
    model, tokenizer = reference
    reply = ask(client, server, messages, max_tokens=10, extra_body={"do_sample": False, "repetition_penalty": 1.3})
    assert reply.choices[0].message.content == expected(reference, "Count to ten.", max_new_tokens=10,
                                                        repetition_penalty=1.3)
    sampled = ask(client, server, messages, max_tokens=10, seed=3, temperature=0.7, top_p=0.9,
                  extra_body={"top_k": 5})
    assert sampled.choices[0].message.content == model.chat(tokenizer, "Count to ten.", max_new_tokens=10,
                                                            temperature=0.7, top_p=0.9, top_k=5, seed=3)[0]


def test_beam_search_equals_chat_with_beams(server, client, reference, images):
    model, tokenizer = reference
    query = "<ImageHere>" + QUESTION
    want = model.chat(tokenizer, query, image=[images["img1"]], do_sample=False, num_beams=3, max_new_tokens=8)[0]
    messages = [{"role": "user", "content": [image_part(data_url(images["img1"])), text_part(QUESTION)]}]
    reply = ask(client, server, messages, max_tokens=8, temperature=0, extra_body={"num_beams": 3})
    assert reply.choices[0].message.content == want
    assert reply.usage.completion_tokens <= 8
    text, _ = streamed(client, server, messages, max_tokens=8, temperature=0, extra_body={"num_beams": 3})
    assert text == want
    assert want != expected(reference, query, image=[images["img1"]], max_new_tokens=8)  # beams do change it


def test_stop_string_cuts_the_answer(server, client, reference):
    messages = [{"role": "user", "content": "Hello there"}]
    full = expected(reference, "Hello there", max_new_tokens=16)
    stop = full.strip()[len(full.strip()) // 2:][:3]  # a piece from the middle of the greedy answer
    assert stop.strip(), full
    reply = ask(client, server, messages, max_tokens=16, temperature=0, stop=[stop, "never-appears"])
    assert reply.choices[0].message.content == full[: full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    text, chunks = streamed(client, server, messages, max_tokens=16, temperature=0, stop=stop)
    assert text == full[: full.index(stop)] and chunks[-1].choices[0].finish_reason == "stop"


def test_request_log_line_has_ids_and_counts_not_the_prompt(server, client, caplog):
    secret = "my-private-question-42"
    with caplog.at_level(logging.INFO, logger="paddlemix.serving"):
        reply = ask(client, server, [{"role": "user", "content": secret}], max_tokens=5, temperature=0)
    lines = [r.getMessage() for r in caplog.records if reply.id in r.getMessage()]
    assert len(lines) == 1, lines
    assert f"{reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens" in lines[0]
    assert secret not in caplog.text


# --- refusals ------------------------------------------------------------------------------------
def assert_error(err: openai.APIStatusError, status: int, param: Any = None) -> Dict[str, Any]:
    assert err.status_code == status
    body = err.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


def refused(client, server, messages, **kwargs) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        ask(client, server, messages, **{"max_tokens": 4, **kwargs})
    return info.value


def image_message(url: str) -> List[Dict[str, Any]]:
    return [{"role": "user", "content": [image_part(url), text_part(QUESTION)]}]


@pytest.mark.parametrize("path, fragment", [("/page.html", "not an image"), ("/noise.bin", "not an image"),
                                            ("/huge.png", "above the limit"), ("/missing.png", "404")])
def test_bad_image_urls_are_400(server, client, images, path, fragment):
    for stream in (False, True):  # refused before a stream starts, too
        err = assert_error(refused(client, server, image_message(images["base"] + path), stream=stream), 400,
                           "messages[0].content[0].image_url.url")
        assert fragment in err["message"] and err["code"] == "invalid_image_url"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "10.1.2.3", "192.168.0.1", "169.254.169.254",
                                  "100.64.0.1", "0.0.0.0", "[::1]", "[::ffff:127.0.0.1]", "[fd00::1]", "[::7f00:1]",
                                  "[2002:7f00:1::]"])
def test_private_hosts_are_refused_by_default(images, host):
    """A client must not make the server fetch its own loopback services, the cloud metadata
    address or the private network (unless the server was started with --allow-private-media-urls)."""
    from paddlemix.serving.errors import APIError
    from paddlemix.serving.media import MediaLoader

    port = images["base"].rsplit(":", 1)[1]  # a loopback image server is really listening there
    with pytest.raises(APIError) as caught:
        MediaLoader().load(f"http://{host}:{port}/img1.png", "messages[0].content[0].image_url.url")
    assert caught.value.status == 400 and "non-public address" in caught.value.message
    assert "--allow-private-media-urls" in caught.value.message
    assert MediaLoader(allow_private_urls=True).load(images["base"] + "/img1.png", "url").size == (300, 200)


@pytest.mark.parametrize("url, fragment", [
    ("http://127.0.0.1\\@example.com:{port}/img1.png", "non-public address (127.0.0.1)"),  # where requests connects
    ("http://[::1", "not a valid URL"), ("http://[example.com]/a.png", "not a valid URL")])
def test_urls_that_parsers_read_differently_or_not_at_all_are_400(images, url, fragment):
    from paddlemix.serving.errors import APIError
    from paddlemix.serving.media import MediaLoader

    url = url.format(port=images["base"].rsplit(":", 1)[1])
    with pytest.raises(APIError) as caught:
        MediaLoader().load(url, "url")
    assert caught.value.status == 400 and fragment in caught.value.message


def test_the_guard_alone_refuses_a_host_that_parsers_disagree_on():
    from paddlemix.models.internlm_xcomposer2.image_processing import ImageLoadError
    from paddlemix.serving.media import refuse_private_hosts

    with pytest.raises(ImageLoadError, match="ambiguous"):
        refuse_private_hosts("http://127.0.0.1\\@example.com/img1.png")  # urllib.parse: example.com


def test_a_redirect_to_a_malformed_url_is_an_image_error(images):
    from paddlemix.models.internlm_xcomposer2.image_processing import ImageLoadError, load_image

    with pytest.raises(ImageLoadError, match="not a valid URL"):
        load_image(images["base"] + "/redirect-malformed")


def test_unreachable_image_url_is_400(server, client):
    from paddlemix.serving.runner import free_port

    err = assert_error(refused(client, server, image_message(f"http://127.0.0.1:{free_port()}/a.png")), 400)
    assert "could not fetch" in err["message"]


@pytest.mark.parametrize("url, fragment", [
    ("data:image/png;base64,@@not-base64@@", "does not decode"),
    ("data:text/plain;base64,aGVsbG8=", "malformed data URL"),
    ("data:image/png,rawdata", "malformed data URL"),
    ("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "not an image"),
    ("data:image/png;base64," + base64.b64encode(png_header(9000, 9000)).decode(), "above the limit"),
    ("/etc/passwd", "outside the allowed"),
    ("file:///etc/hostname", "outside the allowed"),
    ("ftp://example.com/a.png", "unsupported URL scheme"),
])
def test_bad_data_urls_and_paths_are_400(server, client, url, fragment):
    err = assert_error(refused(client, server, image_message(url)), 400)
    assert fragment in err["message"], err


def test_more_images_than_the_limit(server, client, images):
    parts = [image_part(data_url(images["img1"]))] * (MAX_IMAGES + 1) + [text_part("?")]
    err = assert_error(refused(client, server, [{"role": "user", "content": parts}]), 400,
                       f"messages[0].content[{MAX_IMAGES}].image_url.url")
    assert err["code"] == "too_many_images"


def test_unknown_model_is_404(server, client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert assert_error(info.value, 404, "model")["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


@pytest.mark.parametrize("params, param", [
    ({"temperature": -0.5}, "temperature"), ({"temperature": 3}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"max_tokens": 0}, "max_tokens"), ({"max_completion_tokens": -3},
                                                                     "max_completion_tokens"),
    ({"n": 2}, "n"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"seed": "x"}, "seed"),
    ({"logprobs": True}, "logprobs"), ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"extra_body": {"top_k": -1}}, "top_k"), ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
    ({"extra_body": {"do_sample": True}, "temperature": 0}, "temperature"),
    ({"extra_body": {"num_gpus": 2}}, "num_gpus"),
    ({"extra_body": {"num_beams": 3}}, "num_beams"), ({"extra_body": {"num_beams": 0}, "temperature": 0}, "num_beams"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"max_tokens": 40_000}, "max_tokens"),
])
def test_bad_parameters_are_400(server, client, params, param):
    assert_error(refused(client, server, [{"role": "user", "content": "Hi"}], **params), 400, param)


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ([{"role": "assistant", "content": "Hi"}], "messages[0].role"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "messages"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages[1].role"),
    ([{"role": "tool", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": "   "}], "messages[0]"),
    ([{"role": "user", "content": "look: <ImageHere>"}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content[0].image_url.url"),
])
def test_bad_messages_are_400(server, client, messages, param):
    assert_error(refused(client, server, messages), 400, param)


def test_prompt_longer_than_the_context_is_400(server, client, reference):
    model, _ = reference
    err = assert_error(refused(client, server, [{"role": "user", "content": "word " * (model.config.max_length + 10)}]),
                       400, "messages")
    assert err["code"] == "context_length_exceeded"


def test_api_keys(server):
    messages = [{"role": "user", "content": "Hi"}]
    for key in ("wrong-key", ""):
        client = openai.OpenAI(base_url=server["url"] + "/v1", api_key=key or "unused", max_retries=0)
        headers = {"Authorization": ""} if not key else None
        with pytest.raises(openai.AuthenticationError) as info:
            client.chat.completions.create(model=server["name"], messages=messages, extra_headers=headers)
        assert assert_error(info.value, 401)["code"] == "invalid_api_key"
    assert httpx.get(server["url"] + "/v1/models").status_code == 401
    assert httpx.get(server["url"] + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200


def test_a_body_above_the_limit_is_413_before_it_is_read(server):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    url, big = server["url"] + "/v1/chat/completions", b"x" * (MAX_BODY_BYTES + 1)
    declared = httpx.post(url, content=big, headers=headers)  # refused from its Content-Length
    chunked = httpx.post(url, content=iter([big[:1000], big[1000:]]), headers=headers)  # no length: while it streams
    for response in (declared, chunked):
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] == "request_too_large"
    assert "content-length" not in chunked.request.headers


def test_not_json_and_unknown_route(server):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    response = httpx.post(server["url"] + "/v1/chat/completions", content=b"{not json", headers=headers)
    assert response.status_code == 400 and set(response.json()["error"]) == {"message", "type", "param", "code"}
    nested = b"[" * 100_000  # json.loads recurses: RecursionError, not a ValueError
    response = httpx.post(server["url"] + "/v1/chat/completions", content=nested, headers=headers)
    assert response.status_code == 400 and "nests JSON too deeply" in response.json()["error"]["message"]
    response = httpx.get(server["url"] + "/v1/nothing-here", headers=headers)
    assert response.status_code == 404 and "error" in response.json()
