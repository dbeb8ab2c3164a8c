"""Reproducible installs and a suite that cannot hang: constraints.txt, pyproject's bounds, pytest's timeouts."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, Version]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, pinned = line.partition("==")
        assert pinned, f"constraints.txt: {line!r} is not an exact pin (name==version)"
        out[canonicalize_name(name)] = Version(pinned)
    return out


def requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]


def test_constraints_pin_every_requirement_inside_its_range():
    pinned = pins()
    for requirement in requirements():
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"constraints.txt does not pin {requirement.name} (run .ci/lock)"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"constraints.txt pins {name}=={pinned[name]}, outside pyproject's {requirement.specifier}"
        )


@pytest.mark.parametrize("name", ["av", "torch", "torchvision"])
def test_fork_sensitive_dependencies_have_a_lowest_and_a_newest_version(name):
    (requirement,) = [r for r in requirements() if canonicalize_name(r.name) == name]
    operators = {spec.operator for spec in requirement.specifier}
    assert operators & {">=", ">"} and operators & {"<", "<="}, f"{name}: {requirement.specifier} needs both bounds"


def test_installed_av_is_inside_pyproject_range():
    (requirement,) = [r for r in requirements() if r.name == "av"]
    assert requirement.specifier.contains(version("av")), f"installed av {version('av')} is outside {requirement.specifier}"


def test_ci_and_readme_install_with_the_constraints():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"pip\" install [^\n]*-c constraints\.txt", ci), ".ci/run must install with -c constraints.txt"
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, re.S)[:2]
    assert len(commands) == 2 and all("pip install -c constraints.txt" in c for c in commands), commands
    assert "pytest" in commands[1] and "vdiff fit" in commands[0]
    lock = (ROOT / ".ci" / "lock").read_text()
    assert "test_fork_safety.py" in lock and "pip\" freeze" in lock


def test_every_test_has_a_time_limit(request):
    assert float(request.config.getini("timeout")) > 0, "pyproject's [tool.pytest.ini_options] must set timeout"
    assert request.node.get_closest_marker("timeout") is None  # the default test limit comes from the ini


@pytest.mark.slow
def test_slow_tests_get_the_longer_limit(request):
    from tests.conftest import SLOW_TEST_TIMEOUT

    marker = request.node.get_closest_marker("timeout")
    assert marker is not None and marker.args[0] == SLOW_TEST_TIMEOUT
