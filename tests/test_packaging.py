"""pyproject.toml, the lock and the oldest set agree, and CI runs the README's test command."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _pins(name: str) -> dict[str, Version]:
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def _dependencies() -> list[Requirement]:
    return [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]


def test_the_lock_satisfies_every_range():
    lock = _pins("requirements-lock.txt")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    reqs = _dependencies() + [Requirement(r) for name in ("test", "export", "sweep") for r in extras[name]
                              if not r.startswith("flax-resnet")]
    for req in reqs:
        version = lock.get(canonicalize_name(req.name))
        assert version is not None, f"{req.name} is not in requirements-lock.txt"
        assert req.specifier.contains(version, prereleases=True), f"lock has {req.name}=={version}, outside {req}"


def test_the_oldest_set_is_the_lower_bounds():
    # Every ">=" bound of the core stack is a version the suite passed on (experiments/check_oldest.sh).
    oldest = _pins("requirements-oldest.txt")
    for req in _dependencies():
        lower = [s.version for s in req.specifier if s.operator == ">="]
        if lower:
            assert oldest.get(canonicalize_name(req.name)) == Version(lower[0]), (
                f"{req}: requirements-oldest.txt pins {oldest.get(canonicalize_name(req.name))}")


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^python3 -m venv \.venv && .*$", readme, flags=re.M)
    test_cmd = next(c for c in commands if "pytest" in c)
    assert "-c requirements-lock.txt" in test_cmd and all("-c requirements-lock.txt" in c for c in commands)
    assert test_cmd in (ROOT / ".ci" / "run").read_text().splitlines()
