"""README command (c): the Vista quickstart end to end, as a user runs it (slow: about 4 minutes on a free machine).

A tiny action-conditioned UNet-SVD world model trains on synthetic drives with truthful steering and must then turn
the way it is told: the same held-out start frames rolled out with the steering forced left and right scroll the
skyline the commanded way (``vdiff.callbacks.steering.SteeringTest``), and its predictions beat copy-last-frame.

The recipe trains a FIXED number of steps, so the check does not depend on how loaded the CI machine is; it runs here
exactly as a user runs it. Its wall time is a benchmark figure (``benchmarks/quickstart.py``), not asserted here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = 1000
MIN_AGREEMENT = 0.75  # the fraction of held-out clips that must turn BOTH ways as commanded


def _number(pattern: str, text: str) -> re.Match:
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{pattern!r} not in the output:\n{text[-3000:]}"
    return match


@pytest.mark.slow
def test_quickstart_vista_turns_where_it_is_told(tmp_path):
    env = {**os.environ, "VDIFF_CACHE": str(tmp_path / "cache")}
    env.pop("OMP_NUM_THREADS", None)  # the user's default threads, not the test suite's
    vdiff = Path(sys.executable).with_name("vdiff")
    command = [str(vdiff), "fit", "-c", str(REPO / "recipes" / "quickstart_vista.yaml")]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout

    agreement = _number(r"^\s*agreement \(both commands obeyed\): (\d+)/(\d+) .*= ([0-9.]+)$", out)
    obeyed, clips = int(agreement.group(1)), int(agreement.group(2))
    assert clips == 32 and obeyed / clips >= MIN_AGREEMENT, out[-2000:]
    left = float(_number(r"^\s*left\s+\+\S+\s+([+-][0-9.]+)", out).group(1))
    right = float(_number(r"^\s*right\s+-\S+\s+([+-][0-9.]+)", out).group(1))
    assert left > 0 > right, out[-2000:]
    # the measurement itself reads the recorded clips' own turns (else agreement would mean nothing)
    reference = _number(r"reference, the recorded clips .*: (\d+)/(\d+)", out)
    assert int(reference.group(1)) >= 0.9 * int(reference.group(2)), out[-2000:]

    gain = float(_number(r"^gain \(mean - copy last\)\s+([+-][0-9.]+)", out).group(1))
    assert gain > 0.0, out[-3000:]  # the predicted frames beat copying the given frame

    run = tmp_path / "runs" / "quickstart_vista" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list(run.glob("events.out.tfevents.*"))
    assert re.search(rf"`Trainer.fit` stopped: `max_steps={STEPS}` reached", result.stdout + result.stderr)
