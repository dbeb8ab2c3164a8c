"""README command (a) timed: the quickstart recipe from a fresh cache, wall time and what it learned.

    python benchmarks/quickstart.py            # about 5 minutes on 2 CPU cores
    python benchmarks/quickstart.py --recipe recipes/quickstart_vista.yaml --min-gain 0   # the Vista quickstart

Prints the wall time of `vdiff fit -c recipes/quickstart.yaml` (data generation, the time-budgeted
training, validation and the final checkpoint scoring), the training steps it reached, and the
samples' PSNR/SSIM beside the copy-last-frame baseline measured in the same run (the peer a
prediction model must beat). Target on 2 CPU cores: <= 300 s in all and >= +3 dB over copy-last.
A recipe with the steering test (the Vista quickstart) also prints the fraction of held-out clips that turn both
ways as commanded.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "quickstart.yaml"))
    parser.add_argument("--target-seconds", type=float, default=300.0)
    parser.add_argument("--min-gain", type=float, default=3.0, help="target PSNR gain over copy-last, dB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        env = {**os.environ, "VDIFF_CACHE": str(Path(work) / "cache")}
        vdiff = Path(sys.executable).with_name("vdiff")
        start = time.perf_counter()
        result = subprocess.run([str(vdiff), "fit", "-c", args.recipe], cwd=work, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            print(result.stderr[-3000:])
            return result.returncode
        rows = {}
        for name in ("samples, mean of k=1", "copy last given frame"):
            match = re.search(rf"^{re.escape(name)}\s+([0-9.]+)\s+([0-9.]+)", result.stdout, re.MULTILINE)
            rows[name] = (float(match.group(1)), float(match.group(2))) if match else (float("nan"), float("nan"))
        steering = re.search(r"agreement \(both commands obeyed\): (\d+/\d+)", result.stdout)
        checkpoint = next(Path(work).glob("runs/*/version_*/checkpoints/last.ckpt"))
        steps = int(torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)["global_step"])
    (psnr, ssim), (base_psnr, base_ssim) = rows["samples, mean of k=1"], rows["copy last given frame"]
    print(f"{'':<28}{'wall s':>8}{'steps':>8}{'PSNR dB':>10}{'SSIM':>8}")
    print(f"{Path(args.recipe).stem:<28}{seconds:>8.0f}{steps:>8d}{psnr:>10.2f}{ssim:>8.4f}")
    print(f"{'copy last given frame':<28}{'':>8}{'':>8}{base_psnr:>10.2f}{base_ssim:>8.4f}")
    if steering:
        print(f"steering test: {steering.group(1)} held-out clips turn both ways as commanded")
    print(f"gain {psnr - base_psnr:+.2f} dB (target >= {args.min_gain:+.2f}); wall {seconds:.0f} s "
          f"(target <= {args.target_seconds:.0f} s: {'met' if seconds <= args.target_seconds else 'MISSED'}); "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
