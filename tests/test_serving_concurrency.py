"""The server under several clients at once (real ``openai`` clients in threads, uvicorn on
127.0.0.1): requests that arrive together are decoded together with greedy answers equal to
the sequential ones, a full queue answers 429 at once, a client that disconnects stops its
generation, a failure mid-stream ends the stream with an error chunk and ``[DONE]``."""
from __future__ import annotations

import json
import threading
import time
from typing import Any, Dict, Iterator, List

import httpx
import openai
import pytest

from test_serving import API_KEY, data_url, expected, image_part, no_proxy, reference, running_server, text_part

__all__ = ["no_proxy", "reference"]  # fixtures used here

LONG = 20_000  # max_tokens of a request meant to be cut short (the tiny model never reaches it in a test)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny_dir, no_proxy) -> Iterator[Dict[str, Any]]:
    with running_server(tiny_model_dir, tiny_dir, max_batch_size=8, max_queue=8, batch_wait=0.2) as running:
        yield running


def make_client(server, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=API_KEY, max_retries=0, **kwargs)


def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def eight_conversations(tiny_dir) -> List[Dict[str, Any]]:
    """Different prompts, lengths, images and max_tokens: rows of one batch stop on their own."""
    img1, img2 = str(tiny_dir / "img1.png"), str(tiny_dir / "img2.png")
    out = []
    for i in range(8):
        text = f"Question {i}: " + "tell me more " * i
        with_image = [img1, img2][i % 2] if i % 3 else None
        content = [image_part(data_url(with_image)), text_part(text)] if with_image else text
        out.append({"messages": [{"role": "user", "content": content}], "max_tokens": 6 + i,
                    "query": ("<ImageHere>" if with_image else "") + text, "image": with_image})
    return out


def test_eight_concurrent_clients_are_batched_and_equal_the_sequential_answers(server, reference, tiny_dir):
    conversations = eight_conversations(tiny_dir)
    want = [expected(reference, c["query"], image=c["image"] and [c["image"]], max_new_tokens=c["max_tokens"])
            for c in conversations]
    batches: List[int] = []
    server["engine"].on_batch = lambda jobs: batches.append(len(jobs))
    got: List[Any] = [None] * 8
    start = threading.Barrier(8)

    def one(i: int) -> None:
        client = make_client(server, timeout=120)
        start.wait()
        c = conversations[i]
        reply = client.chat.completions.create(model=server["name"], messages=c["messages"],
                                               max_tokens=c["max_tokens"], temperature=0, stream=i % 2 == 1)
        got[i] = (reply.choices[0].message.content if i % 2 == 0
                  else "".join(ch.choices[0].delta.content or "" for ch in reply if ch.choices))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        server["engine"].on_batch = None
    assert got == want  # nothing lost, nothing mixed up, greedy batched == one by one
    assert sum(batches) == 8 and max(batches) > 1, batches  # decoded together, not one after another


def watch_jobs(server) -> List[Any]:
    """The engine's jobs as their batches start (until the engine's observer is reset)."""
    jobs: List[Any] = []
    server["engine"].on_batch = jobs.extend
    return jobs


def assert_stopped_early(server, jobs: List[Any], cancelled_before: int) -> None:
    engine = server["engine"]
    try:
        wait_until(lambda: engine.stats.cancelled == cancelled_before + 1 and engine.idle)
    finally:
        engine.on_batch = None
    (job,) = jobs
    assert job.cancelled and job.done
    tokens = job.completion_tokens
    assert 0 < tokens < LONG // 10  # the generation stopped long before max_tokens
    time.sleep(0.3)
    assert job.completion_tokens == tokens  # and stays stopped


def test_client_disconnect_stops_a_stream(server):
    before, jobs = server["engine"].stats.cancelled, watch_jobs(server)
    client = make_client(server, timeout=60)
    stream = client.chat.completions.create(model=server["name"], messages=[{"role": "user", "content": "Go on"}],
                                            max_tokens=LONG, temperature=0, stream=True)
    received = [chunk for _, chunk in zip(range(4), stream)]
    assert received[0].choices[0].delta.role == "assistant"
    stream.close()  # the client hangs up
    assert_stopped_early(server, jobs, before)


def test_client_disconnect_stops_a_non_streamed_request(server):
    before, jobs = server["engine"].stats.cancelled, watch_jobs(server)
    client = make_client(server, timeout=1.0)
    with pytest.raises(openai.APITimeoutError):  # the client gives up after 1 s and closes the connection
        client.chat.completions.create(model=server["name"], messages=[{"role": "user", "content": "Go on"}],
                                       max_tokens=LONG, temperature=0)
    assert_stopped_early(server, jobs, before)


def test_client_gone_before_the_first_chunk_cancels_the_stream(server):
    """Starlette cancels a response whose client is gone before it ever starts the SSE generator
    (ASGI before spec 2.4): the job must be cancelled all the same, not left generating."""
    import asyncio

    from paddlemix.serving.app import ServerConfig, create_app
    from paddlemix.serving.engine import Engine

    engine = Engine(server["model"], server["tokenizer"])  # not started: the job stays queued, observable
    app = create_app(engine, ServerConfig(model_name="m"))
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stream": True}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> Dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}  # gone right after sending

    async def send(message: Dict[str, Any]) -> None:
        pass

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "root_path": "", "query_string": b"", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 5000),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    asyncio.run(app(scope, receive, send))
    assert engine.stats.cancelled == 1 and engine.waiting == 0


def test_full_queue_answers_429_at_once_and_loses_nothing(server):
    engine = server["engine"]
    client = make_client(server, timeout=120)
    blocker = client.chat.completions.create(model=server["name"], messages=[{"role": "user", "content": "Go"}],
                                             max_tokens=LONG, temperature=0, stream=True)
    next(chunk for chunk in blocker if chunk.choices[0].delta.content)  # generating: the worker is busy with it
    results: List[Any] = [None] * engine.max_queue

    def wait_in_line(i: int) -> None:
        results[i] = make_client(server, timeout=120).chat.completions.create(
            model=server["name"], messages=[{"role": "user", "content": f"Hi {i}"}], max_tokens=3, temperature=0)

    waiting = [threading.Thread(target=wait_in_line, args=(i,)) for i in range(engine.max_queue)]
    for t in waiting:
        t.start()
    wait_until(lambda: engine.waiting == engine.max_queue)
    started = time.perf_counter()
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=server["name"], messages=[{"role": "user", "content": "One more"}],
                                       max_tokens=3)
    assert time.perf_counter() - started < 2.0  # refused at once, not after a wait
    assert info.value.status_code == 429 and info.value.response.json()["error"]["code"] == "queue_full"
    blocker.close()
    for t in waiting:
        t.join(120)
    assert all(r is not None and r.choices[0].message.content is not None for r in results)


def test_mid_stream_failure_sends_an_error_chunk_then_done(server, monkeypatch):
    from paddlemix.serving import engine as engine_module

    real = engine_module.generate_rows

    def failing(*args: Any, **kwargs: Any):
        for step, item in enumerate(real(*args, **kwargs)):
            if step == 3:
                raise RuntimeError("device lost")
            yield item

    monkeypatch.setattr(engine_module, "generate_rows", failing)
    body = {"model": server["name"], "stream": True, "max_tokens": 10, "temperature": 0,
            "messages": [{"role": "user", "content": "Hi"}]}
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][len("data: "):])
    assert set(error) == {"error"} and "device lost" in error["error"]["message"]
    assert error["error"]["type"] == "server_error"
    with pytest.raises(openai.APIError, match="device lost"):  # the official client raises it
        list(make_client(server, timeout=60).chat.completions.create(
            model=server["name"], messages=body["messages"], max_tokens=10, temperature=0, stream=True))
    monkeypatch.setattr(engine_module, "generate_rows", real)
    reply = make_client(server, timeout=60).chat.completions.create(model=server["name"], messages=body["messages"],
                                                                    max_tokens=3, temperature=0)
    assert reply.choices[0].message.content is not None  # the server goes on serving


def test_stopping_fails_waiting_requests_with_503(server):
    from paddlemix.serving.channels import Failed, SyncChannel
    from paddlemix.serving.engine import Engine, Job
    from paddlemix.serving.errors import APIError
    from paddlemix.serving.protocol import parse_chat_request

    engine = Engine(server["model"], server["tokenizer"])  # never started: requests stay waiting
    chat = parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "Hi"}]})
    job = Job(engine.new_id(), chat.conversation, [], chat.sampling, 10, SyncChannel())
    engine.submit(job)
    engine.stop()
    event = job.channel.get(timeout=5)
    assert isinstance(event, Failed) and event.error.status == 503
    with pytest.raises(APIError) as info:
        engine.submit(Job(engine.new_id(), chat.conversation, [], chat.sampling, 10, SyncChannel()))
    assert info.value.status == 503


def engine_job(engine: Any, max_tokens: int, stream: bool = False, text: str = "Hi", **params: Any) -> Any:
    from paddlemix.serving.channels import SyncChannel
    from paddlemix.serving.engine import Job
    from paddlemix.serving.protocol import parse_chat_request

    chat = parse_chat_request({"model": "m", "messages": [{"role": "user", "content": text}],
                               "max_tokens": max_tokens, "temperature": 0, **params})
    return Job(engine.new_id(), chat.conversation, [], chat.sampling, 10, SyncChannel(), stream=stream)


def last_event(job: Any, timeout: float = 60.0) -> Any:
    """The job's final event (``Finished`` or ``Failed``), skipping streamed deltas."""
    from paddlemix.serving.channels import TextDelta

    while True:
        event = job.channel.get(timeout=timeout)
        if not isinstance(event, TextDelta):
            return event


def test_cancelling_the_request_a_batch_waits_for_keeps_the_worker_serving(server):
    from paddlemix.serving.channels import Finished
    from paddlemix.serving.engine import Engine

    engine = Engine(server["model"], server["tokenizer"], batch_wait=1.0).start()
    try:
        first = engine_job(engine, 3)
        engine.submit(first)
        time.sleep(0.3)  # the worker now waits up to batch_wait for rows to join `first`
        engine.cancel(first)
        time.sleep(1.0)  # past the wait: the worker finds its batch empty
        assert engine.alive
        later = engine_job(engine, 3)
        engine.submit(later)
        assert isinstance(last_event(later, timeout=30), Finished)
    finally:
        engine.stop()


@pytest.mark.parametrize("how", ["client leaves", "server stops"])
def test_a_beam_search_stops_when_its_client_leaves_and_builds_its_prompt_once(server, monkeypatch, how):
    from paddlemix.serving.channels import Failed
    from paddlemix.serving.engine import Engine

    model, built = server["model"], []
    build = model._chat_inputs
    monkeypatch.setattr(model, "_chat_inputs", lambda *args: built.append(args) or build(*args))
    engine = Engine(model, server["tokenizer"], batch_wait=0.0).start()
    try:
        job = engine_job(engine, LONG, num_beams=2)  # would search for minutes
        engine.submit(job)
        wait_until(lambda: engine.stats.batches == 1)
        time.sleep(0.5)  # searching
        if how == "client leaves":
            engine.cancel(job)
            wait_until(lambda: engine.idle, timeout=10)
            assert job.done and engine.stats.cancelled == 1 and job.channel.queue.empty()  # nobody to answer
        else:
            engine.stop()
            event = last_event(job, timeout=10)
            assert isinstance(event, Failed) and event.error.status == 503
        assert len(built) == 1  # the prompt (ViT, embeddings) was built once, not again for the beams
    finally:
        engine.stop()


def test_stopping_answers_running_rows_with_503(server):
    from paddlemix.serving.channels import Failed, TextDelta
    from paddlemix.serving.engine import Engine

    engine = Engine(server["model"], server["tokenizer"], batch_wait=0.0).start()
    job = engine_job(engine, LONG, stream=True)
    engine.submit(job)
    assert isinstance(job.channel.get(timeout=60), TextDelta)  # it runs
    engine.stop()
    event = last_event(job, timeout=30)
    assert isinstance(event, Failed) and event.error.status == 503


def test_a_row_that_finished_gets_its_answer_when_a_later_row_of_the_step_fails(server, monkeypatch):
    from paddlemix.serving import engine as engine_module
    from paddlemix.serving.channels import Failed, Finished

    engine = engine_module.Engine(server["model"], server["tokenizer"], batch_wait=2.0).start()
    short, long = engine_job(engine, 2), engine_job(engine, LONG, text="Hello")
    real_feed = engine_module._Row.feed

    def feed(row: Any, *args: Any) -> Any:
        if row.job is long and short.done:  # in the very step where `short` finished
            raise RuntimeError("row failure")
        return real_feed(row, *args)

    monkeypatch.setattr(engine_module._Row, "feed", feed)
    batches: List[int] = []
    engine.on_batch = lambda jobs: batches.append(len(jobs))
    try:
        engine.submit(short)
        engine.submit(long)
        done, failed = last_event(short), last_event(long)
        assert batches == [2]
        assert isinstance(done, Finished) and done.completion_tokens == 2
        assert isinstance(failed, Failed) and "row failure" in failed.error.message
    finally:
        engine.stop()


def test_each_row_streams_its_first_token_as_its_own_prefill_ends(server, monkeypatch):
    """Rows of one batch are prefilled one after another; each row's first token is fed to its
    request (streamed, unless it may be the start of a stop string) before the next row's prefill
    starts, not when the whole batch has been prefilled."""
    from paddlemix.serving.channels import Finished, TextDelta
    from paddlemix.serving.engine import Engine

    engine = Engine(server["model"], server["tokenizer"], batch_wait=2.0, max_batch_size=3)
    jobs = [engine_job(engine, 4, stream=True, text=text) for text in ("Hi", "Tell me a joke.", "Hello there")]
    seen_when_prefilling: List[int] = []  # per prefill: how many rows had their first token by then
    model = server["model"]
    forward = type(model).forward

    def counting(self, *args: Any, **kwargs: Any):
        if kwargs.get("inputs_embeds") is not None:  # a prefill (decode steps pass input_ids)
            seen_when_prefilling.append(sum(job.first_token is not None for job in jobs))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", counting)
    engine.start()
    try:
        for job in jobs:
            engine.submit(job)
        events = [[job.channel.get(timeout=60)] for job in jobs]
        for job, got in zip(jobs, events):
            while not isinstance(got[-1], Finished):
                got.append(job.channel.get(timeout=60))
    finally:
        engine.stop()
    assert [job.batch_size for job in jobs] == [3, 3, 3]
    assert seen_when_prefilling == [0, 1, 2]
    assert [job.first_token for job in jobs] == sorted(job.first_token for job in jobs)
    for job, got in zip(jobs, events):  # the text equals the non-streamed answer of the same request
        assert "".join(e.text for e in got if isinstance(e, TextDelta)) == got[-1].content
