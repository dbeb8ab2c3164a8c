"""README command (a): the quickstart recipe end to end (slow: about 5 minutes on a free 2-core machine).

Both quickstart recipes train a FIXED number of steps (no time budget), so a seed prints the same figures on
any machine, busy or not; the wall time is a benchmark figure (``benchmarks/quickstart.py``), not asserted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
QUICKSTARTS = {"quickstart.yaml": 950, "quickstart_vista.yaml": 1000}


@pytest.mark.parametrize("recipe", sorted(QUICKSTARTS))
def test_quickstart_trains_a_fixed_number_of_steps(recipe):
    trainer = yaml.safe_load((REPO / "recipes" / recipe).read_text())["trainer"]
    assert trainer["max_steps"] == QUICKSTARTS[recipe]  # the step count the README's figures were measured with
    assert trainer.get("max_time") is None  # no time budget: a busy machine takes longer, it does not learn less
    assert trainer["accelerator"] == "auto"


@pytest.mark.slow
def test_quickstart_beats_copy_last_by_3_db(tmp_path):
    env = {**os.environ, "VDIFF_CACHE": str(tmp_path / "cache")}
    env.pop("OMP_NUM_THREADS", None)  # the user's default threads, not the test suite's
    vdiff = Path(sys.executable).with_name("vdiff")
    result = subprocess.run(
        [str(vdiff), "fit", "-c", str(REPO / "recipes" / "quickstart.yaml")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    gain = re.search(r"^gain[^+\n]*?([+-][0-9.]+)", result.stdout, re.MULTILINE)
    assert gain, result.stdout[-3000:]
    assert float(gain.group(1)) >= 3.0, result.stdout[-1500:]
    assert list(tmp_path.glob("runs/quickstart/version_0/checkpoints/last.ckpt"))
    assert list(tmp_path.glob("runs/quickstart/version_0/samples/*.mp4"))
    assert list(tmp_path.glob("runs/quickstart/version_0/events.out.tfevents.*"))
    assert "`Trainer.fit` stopped: `max_steps=950` reached" in result.stdout + result.stderr
