"""The quickstart's trained model through tools/evaluate.py: the tool's accuracy on the quickstart's own
held-out questions equals the accuracy the quickstart itself printed (same checkpoint, same
layout: no system prompt, the image tag before the question, greedy)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

from conftest import REPO_ROOT

EVALUATE = REPO_ROOT / "paddlemix" / "tools" / "evaluate.py"
TYPE_LINE = re.compile(r"^\s+(\w+)\s+(\d+)/(\d+)\s+=", re.MULTILINE)  # "  colour     20/20   = 100.0%"
HELD_OUT = re.compile(r"held-out accuracy ([0-9.]+)% on (\d+) questions")


def test_the_quickstart_model_scores_its_known_accuracy(quickstart_run, tmp_path):
    out, quickstart, _ = quickstart_run
    printed = HELD_OUT.search(quickstart.stdout)
    assert printed, quickstart.stdout[-2000:]
    known_correct = sum(int(c) for _, c, _ in TYPE_LINE.findall(quickstart.stdout))
    # max_new_tokens 8 as the quickstart answers; '' system prompt as it was trained
    result = subprocess.run([sys.executable, str(EVALUATE), "-m", str(out / "checkpoint"), "--data",
                             str(out / "data" / "eval.json"), "--meta_instruction", "", "--max_new_tokens", "8",
                             "--out", str(tmp_path), "--no_progress"], capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    overall = summary["overall"]
    assert overall["total"] == int(printed.group(2)) and overall["correct"] == known_correct
    assert f"{overall['accuracy']:.1%}" == f"{printed.group(1)}%"
    assert summary["bad_rows"]["count"] == 0 and overall["accuracy"] > 0.9
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert all(r["prompt"].startswith("[UNUSED_TOKEN_146]user\n<ImageHere>") for r in records)  # no system prompt
