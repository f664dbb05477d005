"""Runs on a CPU without AVX-512: the golden chat (also on oneDNN's softmax and packed weights, JIT
code chosen at run time) and a training step in a child process on an emulated AVX2-only CPU (``qemu-x86_64 -cpu EPYC-Milan``: AMD Zen 3, AVX2, no AVX-512), which
executes real x86 code and kills the process on any instruction that CPU lacks.

The emulator comes from Debian's ``qemu-user`` package (``.ci/run`` installs it). Without it
these tests are skipped, unless ``IXC2_REQUIRE_EMULATOR=1`` (set by ``.ci/run``) makes its
absence a failure.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

EMULATOR = shutil.which("qemu-x86_64")
AVX2_ONLY_CPU = "EPYC-Milan"
TIMEOUT = 600  # s; the probe takes about a minute emulated


def _emulated(args, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    if EMULATOR is None:
        if os.environ.get("IXC2_REQUIRE_EMULATOR"):
            pytest.fail("qemu-x86_64 not found (apt-get install qemu-user); IXC2_REQUIRE_EMULATOR is set")
        pytest.skip("qemu-x86_64 not installed (apt-get install qemu-user)")
    # one thread: the emulator's thread support deadlocks Paddle's thread pools at start-up
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT / "tests"))
    return subprocess.run([EMULATOR, "-cpu", AVX2_ONLY_CPU, sys.executable, *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO_ROOT / "tests")


def test_the_emulated_cpu_catches_paddles_avx512_rms_norm():
    """The check can fail: Paddle's fused CPU RMSNorm dies with SIGILL on the emulated CPU,
    exactly as on a real AVX2-only machine."""
    code = ("import paddle; paddle.base.core.disable_signal_handler()\n"
            "from paddle.incubate.nn.functional import fused_rms_norm\n"
            "print(paddle.base.core.supports_avx512f(), flush=True)\n"
            "with paddle.no_grad(): fused_rms_norm(paddle.ones([2, 8]), paddle.ones([8]), None, 1e-5, 1)\n")
    result = _emulated(["-c", code], timeout=300)
    assert result.stdout.strip() == "False"
    assert result.returncode == -signal.SIGILL, (result.returncode, result.stderr[-2000:])


def test_chat_and_training_run_on_a_cpu_without_avx512(tiny_dir, golden, golden_json):
    result = _emulated([str(REPO_ROOT / "tests" / "portability_probe.py"), str(tiny_dir)])
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert probe["fused_kernels_on_cpu"] is False
    assert probe["image_ids"] == golden["gen_output_ids"].tolist()
    assert probe["text_ids"] == golden["gen_text_output_ids"].tolist()
    assert probe["text_batched"] == probe["text_alone"] and probe["text_alone"]  # oneDNN's packed weights ran
    assert abs(probe["loss"] - float(golden["train_loss"])) < 1e-4
    # the dropout ran (0.05 on the image rows' LoRA branch moves the loss a little, not far)
    assert probe["dropout"] > 0 and probe["loss_with_dropout"] != probe["loss"]
    assert abs(probe["loss_with_dropout"] - probe["loss"]) < 0.1
