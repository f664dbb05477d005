"""The chat CLI, run as a subprocess on the tiny fixture: greedy answers equal the library's,
and every bad input ends with one ``error: ...`` line and exit code 2 (no traceback)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

CLI = [sys.executable, "-m", "paddlemix.examples.internlm_xcomposer2.chat_demo"]
GREEDY = ["--no-do_sample"]


def run_cli(args: List[str], cwd: Path, stdin: Optional[str] = None,
            env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    # Sequential on purpose: concurrent runs are slower here (their ~4 s is mostly importing).
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, encoding="utf-8",
                          cwd=cwd, timeout=300, env={**os.environ, "PYTHONIOENCODING": "utf-8", **(env or {})})


@pytest.fixture(scope="module")
def chat_model(tiny_model_dir):
    from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2ForCausalLM, InternLMXComposer2Tokenizer

    tokenizer = InternLMXComposer2Tokenizer.from_pretrained(str(tiny_model_dir))
    return InternLMXComposer2ForCausalLM.from_pretrained(str(tiny_model_dir)), tokenizer


def test_single_turn_with_image_prints_the_official_answer(tiny_model_dir, tiny_dir, golden_json, tmp_path):
    out = run_cli(["--from_pretrained", str(tiny_model_dir), *GREEDY, "--max_new_tokens", "16",
                   "--image_path", str(tiny_dir / "img1.png"), "--text", golden_json["chat"]["query"]], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == golden_json["generate"]["response"] + "\n"
    assert out.stderr == "", "a successful run is quiet (no import or SentencePiece noise)"


def test_stream_text_only_prints_the_official_answer(tiny_model_dir, golden_json, tmp_path):
    case = golden_json["generate_text_only"]
    out = run_cli(["--from_pretrained", str(tiny_model_dir), *GREEDY, "--max_new_tokens", "16", "--stream",
                   "--text", case["query"]], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == case["response"] + "\n"


def test_interactive_conversation_matches_the_library(chat_model, tiny_model_dir, tiny_dir, golden_json, tmp_path):
    model, tokenizer = chat_model
    image = str(tiny_dir / "img1.png")
    q1, q2, q3 = "What is in the picture?", "Tell me more.", golden_json["generate_text_only"]["query"]
    script = "\n".join([f"/image {tmp_path / 'missing.png'}", f"/image {image}", q1, q2, "/reset", q3, "/exit",
                        "never asked"]) + "\n"
    out = run_cli(["--from_pretrained", str(tiny_model_dir), *GREEDY, "--max_new_tokens", "8", "--interactive"],
                  tmp_path, stdin=script)
    assert out.returncode == 0, out.stderr

    settings = dict(do_sample=False, max_new_tokens=8)
    r1, history = model.chat(tokenizer, "<ImageHere>" + q1, image=[image], **settings)
    r2, _ = model.chat(tokenizer, q2, image=[image], history=history, **settings)  # images re-supplied
    r3, _ = model.chat(tokenizer, q3, **settings)
    assert out.stdout == f"{r1}\n{r2}\n{r3}\n"
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "missing.png" in errors[0], out.stderr  # the bad image only; not added
    assert "Traceback" not in out.stderr


BAD_INPUTS = {
    # id: (arguments after the model, model path or None for the fixture, extra env, expected in the message)
    "missing-image": (["--image_path", "{tmp}/missing.png", "--text", "hi"], None, {}, "missing.png"),
    "corrupt-image": (["--image_path", "{tmp}/corrupt.png", "--text", "hi"], None, {}, "corrupt.png"),
    "unreachable-url": (["--image_path", "http://127.0.0.1:9/x.png", "--text", "hi"], None, {}, "127.0.0.1:9"),
    "missing-model-dir": (["--text", "hi"], "{tmp}/no-such-checkpoint", {}, "no-such-checkpoint"),
    "hub-id-offline": (["--text", "hi"], "internlm/internlm-xcomposer2-7b",
                       {"PPNLP_HOME": "{tmp}/ppnlp-home", "PPNLP_ENDPOINT": "http://127.0.0.1:9",
                        "HF_HUB_OFFLINE": "1"},
                       "could not load 'internlm/internlm-xcomposer2-7b'"),
    "tag-count-mismatch": (["--image_path", "{img}", "--text", "<ImageHere><ImageHere>Compare."], None, {},
                           "<ImageHere>"),
}


@pytest.fixture(scope="module")
def bad_runs(tiny_model_dir, tiny_dir, tmp_path_factory) -> Dict[str, subprocess.CompletedProcess]:
    """One run per bad input, with the files they need."""
    tmp = tmp_path_factory.mktemp("bad-inputs")
    (tmp / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png" * 4)
    (tmp / "ppnlp-home").mkdir()

    def fill(text: str) -> str:
        return text.format(tmp=tmp, img=tiny_dir / "img1.png")

    runs = {}
    for case, (args, model, env, _) in BAD_INPUTS.items():
        model = fill(model) if model else str(tiny_model_dir)
        runs[case] = run_cli(["--from_pretrained", model, *map(fill, args)], tmp,
                             env={k: fill(v) for k, v in env.items()})
    return runs


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_is_one_error_line_and_exit_2(case, bad_runs):
    out, expected = bad_runs[case], BAD_INPUTS[case][3]
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert expected in lines[0]
    if case == "hub-id-offline":
        assert "--from_pretrained /path/to/dir" in lines[0]
    assert out.stdout == ""


def test_no_question_is_a_usage_error(tiny_model_dir, tmp_path):
    out = run_cli(["--from_pretrained", str(tiny_model_dir)], tmp_path)
    assert out.returncode == 2
    assert out.stderr.startswith("usage:") and "error: give a question with --text" in out.stderr
    assert "Traceback" not in out.stderr
