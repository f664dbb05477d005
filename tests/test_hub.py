"""Model ids resolve like PaddleNLP's: a local directory, then the cache, then the source (``hub.py``).

PaddleNLP reads ``PPNLP_ENDPOINT`` / ``PPNLP_HOME`` (and the offline switches) when it is imported, so
every download runs in a subprocess with its own environment, against a loopback HTTP server that
serves temp copies of the fixtures in the layout of PaddleNLP's community store.
"""
from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import paddle
import pytest
from conftest import REPO_ROOT, TINY, TINY_PADDLEMIX, tiny_overrides

from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2ForCausalLM, InternLMXComposer2Tokenizer
from paddlemix.models.internlm_xcomposer2.processor import InternLMXComposer2Processor

REPO = "internlm/internlm-xcomposer2-7b"
SHARDED = "acme/ixc2-tiny-sharded"
STORE = "models/community"
HF_FILES = ("pytorch_model.bin", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
            "generation_config.json")  # what the official HF repo ships (one .bin, like the real 7B)

# Runs in the subprocess: every case is (what, repo, kwargs); prints one JSON line with the outcomes.
SCRIPT = r"""
import json, sys
from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2ForCausalLM, InternLMXComposer2Tokenizer
from paddlemix.models.internlm_xcomposer2.processor import InternLMXComposer2Processor

args = json.loads(sys.argv[1])
out = []
for what, repo, kwargs in args["cases"]:
    try:
        if what == "chat":
            model = InternLMXComposer2ForCausalLM.from_pretrained(repo, **kwargs)
            tokenizer = InternLMXComposer2Tokenizer.from_pretrained(repo, **kwargs)
            ids, _ = model.generate_ids(tokenizer, args["query"], image=args["image"], do_sample=False,
                                        max_new_tokens=16)
            out.append({"ids": ids})
        else:
            cls = {"model": InternLMXComposer2ForCausalLM, "tokenizer": InternLMXComposer2Tokenizer,
                   "processor": InternLMXComposer2Processor}[what]
            cls.from_pretrained(repo, **kwargs)
            out.append({"ok": True})
    except Exception as err:
        out.append({"error": type(err).__name__, "oserror": isinstance(err, OSError), "message": str(err)})
print("RESULT " + json.dumps(out))
"""


class Store:
    """A loopback HTTP server (HEAD + GET) over ``root``; records every request."""

    def __init__(self, root: Path) -> None:
        self.requests: List[str] = []
        store = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                store.requests.append("HEAD " + self.path)
                super().do_HEAD()

            def do_GET(self) -> None:
                store.requests.append("GET " + self.path)
                super().do_GET()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                      functools.partial(Handler, directory=str(root)))
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def serve(tmp_path: Path) -> Iterator:
    stores: List[Store] = []

    def start(root: Path) -> Store:
        stores.append(Store(root))
        return stores[-1]

    yield start
    for store in stores:
        if store.server.socket.fileno() != -1:
            store.stop()


def _copy(files: Dict[str, Path], repo_dir: Path) -> None:
    """Plain copies (the fixtures are read-only; copying their modes would make tmp undeletable)."""
    for rel, src in files.items():
        (repo_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, repo_dir / rel)


def _env(home: Path, **extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.lower().endswith("_proxy") and not k.startswith(("PPNLP_", "AISTUDIO_", "HF_", "HUGGINGFACE_"))}
    env.update(PPNLP_HOME=str(home / "ppnlp"), HF_HOME=str(home / "hf"), AISTUDIO_HUB_CACHE=str(home / "aistudio"),
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", HF_HUB_DISABLE_TELEMETRY="1")
    env.update(extra)
    return env


def _start(env: Dict[str, str], cases: list, golden_json: Optional[dict] = None) -> subprocess.Popen:
    args = {"cases": cases, "query": golden_json["chat"]["query"] if golden_json else "",
            "image": str(TINY / "img1.png")}
    return subprocess.Popen([sys.executable, "-c", SCRIPT, json.dumps(args)], env=env, cwd=str(REPO_ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> list:
    stdout, stderr = proc.communicate(timeout=120)
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, stdout[-3000:] + stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def _run(env: Dict[str, str], cases: list, golden_json: Optional[dict] = None) -> list:
    return _result(_start(env, cases, golden_json))


def test_paddlemix_checkpoint_downloads_then_loads_from_cache(tmp_path, serve, golden, golden_json):
    repo_dir = tmp_path / "www" / STORE / REPO
    _copy({str(p.relative_to(TINY_PADDLEMIX)): p for p in TINY_PADDLEMIX.rglob("*") if p.is_file()}, repo_dir)
    store = serve(tmp_path / "www")
    env = _env(tmp_path, PPNLP_ENDPOINT=store.endpoint)
    expected = [{"ids": golden["gen_output_ids"].tolist()}]

    assert _run(env, [["chat", REPO, {}]], golden_json) == expected
    gets = {r.split(" ", 1)[1] for r in store.requests if r.startswith("GET ")}
    prefix = f"/{STORE}/{REPO}/"
    assert gets == {prefix + f for f in ("config.json", "vision_tower/config.json", "model_state.pdparams",
                                         "tokenizer_config.json", "special_tokens_map.json",
                                         "sentencepiece.bpe.model")}  # never the tower's weights
    cached = tmp_path / "ppnlp" / "models" / REPO
    assert (cached / "model_state.pdparams").read_bytes() == (TINY_PADDLEMIX / "model_state.pdparams").read_bytes()
    assert (cached / "vision_tower" / "config.json").is_file()

    # Server gone: any request (even the HEAD of an optional file) would now fail the load, so a
    # successful run proves that every file, optional ones included, came from the cache.
    seen = len(store.requests)
    store.stop()
    assert _run(env, [["chat", REPO, {}]], golden_json) == expected
    assert len(store.requests) == seen


def test_official_torch_layout_downloads_and_converts(tmp_path, serve, golden, golden_json):
    from safetensors.numpy import load_file, save_file

    www = tmp_path / "www"
    config = json.loads((TINY / "config.json").read_text(encoding="utf-8"))
    config.update(tiny_overrides())
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    files = {name: TINY / name for name in HF_FILES}
    _copy({**files, "config.json": tmp_path / "config.json"}, www / STORE / REPO)
    # The same weights as torch-layout safetensors in two shards with an index.
    tensors = load_file(str(TINY / "model.safetensors"))
    names, sharded = sorted(tensors), www / STORE / SHARDED
    files.pop("pytorch_model.bin")
    _copy({**files, "config.json": tmp_path / "config.json"}, sharded)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(sharded / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}), encoding="utf-8")
    store = serve(www)
    env = _env(tmp_path, PPNLP_ENDPOINT=store.endpoint)
    cases = [["chat", REPO, {}], ["chat", SHARDED, {}]]
    expected = [{"ids": golden["gen_output_ids"].tolist()}] * 2

    assert _run(env, cases, golden_json) == expected
    gets = {r.split(" ", 1)[1] for r in store.requests if r.startswith("GET ")}
    assert f"/{STORE}/{REPO}/pytorch_model.bin" in gets
    assert {f"/{STORE}/{SHARDED}/model-0000{i}-of-00002.safetensors" for i in (1, 2)} <= gets
    store.stop()
    assert _run(env, cases, golden_json) == expected  # shards come from the cache too


def test_local_paddlemix_directory(golden):
    model = InternLMXComposer2ForCausalLM.from_pretrained(str(TINY_PADDLEMIX))
    embeds = paddle.to_tensor(golden["chat_inputs_embeds"])[None]
    im_mask = paddle.to_tensor(golden["chat_im_mask"])[None]
    with paddle.no_grad():
        logits = model(inputs_embeds=embeds, im_mask=im_mask).logits[0].numpy()
    np.testing.assert_allclose(logits[-1], golden["chat_logits_last"], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(logits.argmax(-1), golden["chat_logits_argmax"])
    tokenizer = InternLMXComposer2Tokenizer.from_pretrained(TINY_PADDLEMIX)
    assert tokenizer("Hello")["input_ids"][0] == tokenizer.bos_token_id
    processor = InternLMXComposer2Processor.from_pretrained(str(TINY_PADDLEMIX))
    assert processor.num_image_tokens == 256
    np.testing.assert_array_equal(processor.pixel_values(str(TINY / "img1.png"))[0], golden["img1_pixel_values"])


def _download_error(repo: str, file: str, source: str, reason: str, fix: str) -> dict:
    message = (f"Could not download {file} of {repo} from {source} ({reason}): pass a local checkpoint directory "
               f'instead, e.g. from_pretrained("/path/to/{repo.split("/")[-1]}"), or {fix}.')
    return {"error": "ModelDownloadError", "oserror": True, "message": message}


def test_download_errors_name_the_file_the_source_and_the_fix(tmp_path, serve):
    _copy({"config.json": TINY_PADDLEMIX / "config.json", "tokenizer_config.json": TINY / "tokenizer_config.json"},
          tmp_path / "www" / STORE / "acme/no-weights")
    server = serve(tmp_path / "www")
    missing = _start(_env(tmp_path / "c", PPNLP_ENDPOINT=server.endpoint),
                     [["model", "acme/missing", {}], ["model", "acme/no-weights", {}],
                      ["tokenizer", "acme/no-weights", {}]])
    unreachable = _start(_env(tmp_path / "a", PPNLP_ENDPOINT="http://127.0.0.1:9"),
                         [["model", REPO, {}], ["tokenizer", REPO, {}], ["processor", REPO, {}]])
    offline = _start(_env(tmp_path / "b", AISTUDIO_BOS_OFFLINE="1", HF_HUB_OFFLINE="1"),
                     [["model", REPO, {}], ["model", REPO, {"from_aistudio": True}],
                      ["model", REPO, {"from_hf_hub": True}], ["tokenizer", REPO, {"from_hf_hub": True}]])

    store = "the PaddleNLP model store (http://127.0.0.1:9)"
    down = _download_error(REPO, "config.json", store, "the server is unreachable",
                           "set PPNLP_ENDPOINT or check the network")
    tokenizer_down = dict(down, message=down["message"].replace(" config.json ", " tokenizer_config.json "))
    assert _result(unreachable) == [down, tokenizer_down, down]

    bos = "the PaddleNLP model store (https://bj.bcebos.com/paddlenlp)"
    hf = "the Hugging Face Hub (https://huggingface.co)"
    assert _result(offline) == [
        _download_error(REPO, "config.json", bos, "offline mode is on", "unset AISTUDIO_BOS_OFFLINE"),
        _download_error(REPO, "config.json", "AI Studio (http://git.aistudio.baidu.com)", "offline mode is on",
                        "unset AISTUDIO_BOS_OFFLINE"),
        _download_error(REPO, "config.json", hf, "offline mode is on", "unset HF_HUB_OFFLINE"),
        _download_error(REPO, "tokenizer_config.json", hf, "offline mode is on", "unset HF_HUB_OFFLINE"),
    ]

    out = _result(missing)
    source = f"the PaddleNLP model store ({server.endpoint})"
    assert [o["error"] for o in out] == ["FileNotFoundError"] * 3
    assert out[0]["message"].startswith(f"'acme/missing' on {source} has no config.json: check the model id")
    weights = "model.safetensors.index.json, model.safetensors, model_state.pdparams.index.json"
    assert f"'acme/no-weights' on {source} has no {weights}" in out[1]["message"]
    assert "has no tokenizer.model, sentencepiece.bpe.model" in out[2]["message"]
    # A mistyped local path is not sent to a server: the local loaders report it as before.
    with pytest.raises(FileNotFoundError, match="/no/such/ckpt"):
        InternLMXComposer2ForCausalLM.from_pretrained("/no/such/ckpt")
