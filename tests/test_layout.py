"""Package layout rules: the model package has no import circle (at module level or inside
functions) and does not load the capability packages built on top of it."""
from __future__ import annotations

import ast
import subprocess
import sys
from typing import Dict, List, Set

from conftest import REPO_ROOT

MODEL_PACKAGE = REPO_ROOT / "paddlemix" / "models" / "internlm_xcomposer2"
CAPABILITIES = ("paddlemix.serving", "paddlemix.composition", "paddlemix.evaluation", "paddlemix.finetune")


def _imports() -> Dict[str, Set[str]]:
    """Module → the package's modules it imports (relative imports, any depth in the file)."""
    modules = {p.stem for p in MODEL_PACKAGE.glob("*.py")}
    graph = {}
    for path in MODEL_PACKAGE.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [alias.name for alias in node.names]
                deps |= {n.split(".")[0] for n in names if n and n.split(".")[0] in modules}
        graph[path.stem] = deps
    return graph


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[node] = 2
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_no_import_circle_in_the_model_package():
    graph = _imports()
    assert len(graph) > 15 and graph["modeling"]  # the graph was really read
    assert _cycle(graph) == [], f"import circle: {' -> '.join(_cycle(graph))}"


def test_a_circle_would_be_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_importing_the_model_package_loads_no_capability_package():
    code = ("import sys, paddlemix.models.internlm_xcomposer2\n"
            f"print([m for m in {CAPABILITIES!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
