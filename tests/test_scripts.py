"""Every script under paddlemix/examples and paddlemix/tools runs the two ways PaddleMIX users run
them from the repository root: by path (``python paddlemix/tools/x.py``) and as a module
(``python -m paddlemix.tools.x``)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO_ROOT

SCRIPTS = sorted(p.relative_to(REPO_ROOT) for folder in ("paddlemix/examples", "paddlemix/tools")
                 for p in (REPO_ROOT / folder).rglob("*.py") if p.name != "__init__.py")


def test_the_list_of_scripts_is_not_empty():
    names = {p.name for p in SCRIPTS}
    assert {"chat_demo.py", "quickstart.py", "supervised_finetune.py", "merge_lora_params.py"} <= names


def _help_both_ways(script):
    module = ".".join(script.with_suffix("").parts)
    runs = [subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for cmd in ([sys.executable, str(script), "--help"], [sys.executable, "-m", module, "--help"])]
    outputs = [run.communicate(timeout=120) for run in runs]  # both run at once; communicate: no full pipe
    return [(run.returncode, out, err) for run, (out, err) in zip(runs, outputs)]


@pytest.mark.parametrize("script", SCRIPTS, ids=str)
def test_help_by_path_and_as_module(script):
    for code, out, err in _help_both_ways(script):
        assert code == 0, err[-2000:]
        assert out.lstrip().startswith("usage:"), out[:500]
