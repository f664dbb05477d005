"""Shared test fixtures: locate ``../shared`` (the golden fixtures) next to the repository."""
from __future__ import annotations

import contextlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List, Tuple

import numpy as np
import pytest

from paddlemix.cpu_env import configure_cpu_environment

configure_cpu_environment()  # this process is an entry point too: before anything imports Paddle

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IXC2_SHARED", REPO_ROOT.parent / "shared"))
TINY = SHARED / "fixtures" / "ixc2-tiny"
TINY_PADDLEMIX = SHARED / "fixtures" / "ixc2-tiny-paddlemix"
LOOPBACK_NO_PROXY = "127.0.0.1,localhost"  # a proxy in the environment must not intercept loopback test servers


@contextlib.contextmanager
def loopback_server(handler) -> Iterator[str]:
    """Serve ``handler`` on 127.0.0.1 (a free port) from a daemon thread; yields the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def loopback_no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", LOOPBACK_NO_PROXY)
    monkeypatch.setenv("no_proxy", LOOPBACK_NO_PROXY)


def norm_kernel_paths() -> list:
    """The RMSNorm kernels this machine can run: the plain one everywhere, the fused one only
    with AVX-512 (Paddle's CPU kernel has no CPU check; see ``kernels.py``)."""
    from paddlemix.models.internlm_xcomposer2.kernels import cpu_has_avx512

    return ["plain", "fused"] if cpu_has_avx512() else ["plain"]


@pytest.fixture(params=norm_kernel_paths())
def norm_kernels(request) -> Iterator[str]:
    """Runs a test once per kernel path this CPU can take, forcing it for the test's duration."""
    from paddlemix.models.internlm_xcomposer2.kernels import fused_kernels_on_cpu, set_fused_kernels_on_cpu

    set_fused_kernels_on_cpu(request.param == "fused")
    assert fused_kernels_on_cpu() == (request.param == "fused")
    try:
        yield request.param
    finally:
        set_fused_kernels_on_cpu(None)


@pytest.fixture(params=["paddle", "onednn"])
def softmax_kernels(request, monkeypatch) -> str:
    """Runs a test once per softmax kernel inference may take on a CPU (kernels.softmax_last):
    Paddle's, and oneDNN's, forced here for every size (the fixture's scores are all small)."""
    from paddlemix.models.internlm_xcomposer2 import kernels

    monkeypatch.setattr(kernels, "SOFTMAX_MIN_ELEMENTS", 0 if request.param == "onednn" else 1 << 62)
    return request.param


@pytest.fixture(params=["paddle", "numpy"])
def row_gemms(request) -> Iterator[str]:
    """Runs a test once per kernel a single-row product (a decode step) can take on a CPU:
    Paddle's matmul (Intel's default) and NumPy's BLAS (other vendors' default; see row_gemm.py),
    there for every weight, however small (the fixture's are all small)."""
    from paddlemix.models.internlm_xcomposer2.row_gemm import row_gemm, set_row_gemm

    set_row_gemm(request.param, min_weight_bytes=0)
    assert row_gemm() == request.param
    try:
        yield request.param
    finally:
        set_row_gemm(None)


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    if not TINY.is_dir():
        pytest.fail(f"golden fixture not found at {TINY}; set IXC2_SHARED to the shared/ directory")
    return TINY


@pytest.fixture(scope="session")
def golden(tiny_dir: Path) -> dict:
    with np.load(tiny_dir / "golden.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def golden_json(tiny_dir: Path) -> dict:
    return json.loads((tiny_dir / "golden.json").read_text(encoding="utf-8"))


def tiny_overrides() -> dict:
    """The values the official code hard-codes (ViT config, PLoRA rank/alpha), for the tiny fixture."""
    values = json.loads((TINY / "tiny_overrides.json").read_text(encoding="utf-8"))
    return {k: values[k] for k in ("vision_config", "lora_r", "lora_alpha")}


@pytest.fixture(scope="session")
def tiny_config(tiny_dir: Path):
    from paddlemix.models.internlm_xcomposer2.checkpoint import load_config

    return load_config(str(tiny_dir), **tiny_overrides())


@pytest.fixture()
def tiny_model(tiny_dir: Path, tiny_config):
    """A freshly loaded fixture model in eval mode (cheap: ~3 M parameters)."""
    from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2ForCausalLM

    return InternLMXComposer2ForCausalLM.from_pretrained(str(tiny_dir), config=tiny_config)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_dir: Path) -> Path:
    """The official fixture as a checkpoint directory whose config.json already holds the
    tiny overrides (weights symlinked, not copied), for code paths that take only a path."""
    out = tmp_path_factory.mktemp("ixc2-tiny-merged")
    config = json.loads((tiny_dir / "config.json").read_text(encoding="utf-8"))
    config.update(tiny_overrides())
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    for name in ("model.safetensors", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json"):
        (out / name).symlink_to(tiny_dir / name)
    return out


QUICKSTART = [sys.executable, "-m", "paddlemix.examples.internlm_xcomposer2.quickstart"]
# Same code path as the default run (1128 steps, 300 questions), fewer steps and questions. Measured on
# this machine type: 98 % held-out accuracy after these 400 steps (~65 s).
QUICKSTART_REDUCED = ["--seed", "1", "--steps", "400", "--num_train", "3000", "--num_eval", "60"]
QUICKSTART_TIMEOUT = 300


def run_timed(args: List[str], timeout: int = QUICKSTART_TIMEOUT) -> Tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    return result, time.perf_counter() - started


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> Tuple[Path, subprocess.CompletedProcess, float]:
    """The quickstart run once per session on the reduced budget, as a user runs it: ``(output
    directory, the finished process, seconds)``. Its checkpoint is ``<dir>/checkpoint`` and its data
    ``<dir>/data/{train,eval}.json``; tests only read them."""
    out = tmp_path_factory.mktemp("quickstart")
    result, seconds = run_timed(QUICKSTART + ["--output_dir", str(out), *QUICKSTART_REDUCED])
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result, seconds
