"""``serve.py`` and ``web_demo.py`` as users start them: separate processes on 127.0.0.1, talked
to with the ``openai`` client / ``gradio_client``, stopped with Ctrl-C; bad input is one
``error:`` line."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Iterator, List

import httpx
import openai
import pytest

from conftest import LOOPBACK_NO_PROXY, REPO_ROOT
from paddlemix.cli_utils import EXIT_INTERRUPTED

SCRIPTS = REPO_ROOT / "paddlemix" / "examples" / "internlm_xcomposer2"
START_TIMEOUT = 120.0


def free_port() -> int:
    from paddlemix.serving.runner import free_port as pick

    return pick()


def environment() -> dict:
    return dict(os.environ, NO_PROXY=LOOPBACK_NO_PROXY, no_proxy=LOOPBACK_NO_PROXY, PYTHONUNBUFFERED="1")


def started(args: List[str], ready_url: str) -> Iterator[subprocess.Popen]:
    """Run a script until ``ready_url`` answers 200; Ctrl-C it afterwards (it must exit cleanly)."""
    process = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while True:
            assert process.poll() is None, process.communicate()[1][-3000:]
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the script did not start"
            time.sleep(0.2)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_serve_py_answers_an_openai_client_and_logs_one_line_per_request(tiny_model_dir):
    port = free_port()
    args = [str(SCRIPTS / "serve.py"), "--from_pretrained", str(tiny_model_dir), "--host", "127.0.0.1",
            "--port", str(port), "--model_name", "tiny", "--api-keys", "k1", "k2", "--cpu_weight_packing", "on"]
    for process in started(args, f"http://127.0.0.1:{port}/health"):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k2", max_retries=0)
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "secret-words"}],
                                               max_tokens=5, temperature=0)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="other", messages=[{"role": "user", "content": "Hi"}])
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    assert process.returncode == EXIT_INTERRUPTED and "Traceback" not in err, err[-2000:]  # Ctrl-C: a clean stop
    assert f"serving 'tiny' on http://127.0.0.1:{port}/v1" in out
    lines = [line for line in err.splitlines() if reply.id in line]
    assert len(lines) == 1 and f"{reply.usage.prompt_tokens} prompt + 5 completion tokens" in lines[0], err[-2000:]
    assert "refused (404 model_not_found)" in err
    assert "secret-words" not in err + out
    assert "decode weights packed for batches of up to 8 rows" in err  # --cpu_weight_packing on reached the engine


def test_web_demo_py_in_process_and_on_a_server(tiny_model_dir, tiny_dir):
    from gradio_client import Client

    port = free_port()
    args = [str(SCRIPTS / "web_demo.py"), "--from_pretrained", str(tiny_model_dir), "--port", str(port),
            "--meta_instruction", ""]
    for _ in started(args, f"http://127.0.0.1:{port}/"):
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        chatbot, _ = client.predict({"text": "Hi", "files": []}, "", 4, 1, 1.005, False, 1.0, 0.8, -1,
                                    api_name="/chat")
        assert [m["role"] for m in chatbot] == ["user", "assistant"]


@pytest.mark.parametrize("script, args, message", [
    ("serve.py", ["--from_pretrained", "/no/such/checkpoint"], "/no/such/checkpoint"),
    ("serve.py", ["--from_pretrained", "x", "--allowed-local-media-path", "/no/such/dir"], "not a directory"),
    ("web_demo.py", ["--api_base", "http://127.0.0.1:9/v1"], "cannot list the models"),
])
def test_bad_input_is_one_error_line(script, args, message):
    result = subprocess.run([sys.executable, str(SCRIPTS / script), *args], cwd=REPO_ROOT, env=environment(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr
