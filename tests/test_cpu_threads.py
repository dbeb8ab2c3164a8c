"""The `vdiff` command shares the CPU cores fairly: PyTorch's OpenMP threads sleep while they wait instead of spinning
(the quickstart trained ~4x below its fair share beside busy processes; benchmarks/quickstart.py --background)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vdiff.cpu_threads import share_cores_fairly


def test_sets_a_passive_wait_policy_unless_one_is_chosen():
    environ: dict[str, str] = {}
    assert share_cores_fairly(environ) and environ == {"OMP_WAIT_POLICY": "PASSIVE"}
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "10000"}):
        environ = dict(chosen)
        assert not share_cores_fairly(environ) and environ == chosen


PROGRAM = "from vdiff.cli import main\nmain(['--help'])\nimport torch\n"  # the command runs, then torch loads


def _spin_count(**chosen: str) -> str:
    """GOMP_SPINCOUNT as the OpenMP runtime read it when PyTorch loaded it after the `vdiff` command started."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(chosen, OMP_DISPLAY_ENV="verbose")
    result = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    counts = [line.split("=")[1].strip(" '") for line in result.stderr.splitlines() if "GOMP_SPINCOUNT =" in line]
    if not counts:
        pytest.skip("PyTorch's OpenMP runtime is not libgomp here (no GOMP_SPINCOUNT in OMP_DISPLAY_ENV)")
    return counts[0]


def test_the_vdiff_command_sets_it_before_torch_loads_openmp():
    assert _spin_count() == "0"  # passive: a waiting thread sleeps at once (libgomp's default spins 300000 turns)


def test_a_policy_the_user_chose_is_kept():
    assert _spin_count(GOMP_SPINCOUNT="1000") == "1000"
