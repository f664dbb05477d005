"""The lock is complete: every package the project's install reaches (its requirements with the
``cpu`` and ``test`` extras, transitively) is pinned in constraints.txt, at the version installed
here; and the direct pins agree with it."""
from __future__ import annotations

import re
from importlib import metadata
from typing import Dict, Set, Tuple

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO_ROOT

PROJECT = "paddlemix-ixc2"
EXTRAS = ("cpu", "test")


def _pins(path) -> Dict[str, str]:
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
            assert match, f"{path.name}: not an exact pin: {line!r}"
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def _reached(name: str, extras=(), seen: Set[Tuple[str, str]] = None) -> Set[str]:
    """Installed distributions ``name`` (with ``extras``) needs here, itself included. A package
    reached again with other extras is walked again for them."""
    seen = set() if seen is None else seen
    for extra in extras or ("",):
        key = (canonicalize_name(name), extra)
        if key in seen:
            continue
        seen.add(key)
        for text in metadata.distribution(name).requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                _reached(req.name, tuple(req.extras), seen)
    return {dist for dist, _ in seen}


def test_every_installed_dependency_is_locked_at_its_version():
    locked = _pins(REPO_ROOT / "constraints.txt")
    reached = _reached(PROJECT, EXTRAS) - {canonicalize_name(PROJECT)}
    assert len(reached) > 100  # the whole tree (paddle, paddlenlp, gradio, ...), not just the direct pins
    missing = sorted(name for name in reached if name not in locked)
    assert not missing, f"not in constraints.txt (rerun scripts/lock.sh): {missing}"
    wrong = {name: (metadata.version(name), locked[name]) for name in reached if metadata.version(name) != locked[name]}
    assert not wrong, f"installed version != locked version: {wrong}"


def test_direct_pins_are_the_locked_versions():
    locked, direct = _pins(REPO_ROOT / "constraints.txt"), _pins(REPO_ROOT / "requirements" / "direct.txt")
    assert {name: locked.get(name) for name in direct} == direct
