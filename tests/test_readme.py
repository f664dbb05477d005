"""The README's first two commands are exactly what CI runs."""
from __future__ import annotations

import re

from conftest import REPO_ROOT


def _readme_commands() -> list:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README must start with a bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_first_block_is_two_commands_that_ci_runs():
    commands = _readme_commands()
    assert len(commands) == 2
    ci = (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    for command in commands:
        assert command in ci, f"README command not run verbatim by .ci/run: {command}"
