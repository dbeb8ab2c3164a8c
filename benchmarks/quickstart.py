"""README command (a) timed: the quickstart recipe from a fresh cache, wall time and what it learned; and how its
training rate holds up when other processes share the cores.

    python benchmarks/quickstart.py            # about 5 minutes on 2 free CPU cores
    python benchmarks/quickstart.py --recipe recipes/quickstart_vista.yaml --min-gain 0   # the Vista quickstart
    python benchmarks/quickstart.py --background 2 4   # + training steps/s beside 2, then 4 busy processes

Prints the wall time of `vdiff fit -c recipes/quickstart.yaml` (data generation, the training's fixed steps,
validation and the final checkpoint scoring), the training steps, and the samples' PSNR/SSIM beside the
copy-last-frame baseline measured in the same run (the peer a prediction model must beat). Target on 2 free CPU
cores: <= 300 s in all and >= +3 dB over copy-last (the recipes train a fixed number of steps: the time is what this
measures, not a budget that cuts training short). A recipe with the steering test (the Vista quickstart) also prints
the fraction of held-out clips that turn both ways as commanded.

``--background N ...`` then trains the same recipe for ``--rate-steps`` steps once per N with N busy processes
(each a Python loop spinning on one core) started before and stopped after, and prints a table of training steps/s
(steps ``--rate-from`` to ``--rate-steps``, from the logged losses' wall times: no data generation, start-up or final
scoring in it) against the free run's rate over the same steps. Target: at least 2 / (2 + N) of the free rate on 2
cores (the fair share when N other processes want a core each).
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
BUSY = "while True:\n    pass\n"


def fit(recipe: str, work: Path, extra: list[str], background: int = 0) -> tuple[float, subprocess.CompletedProcess]:
    """Run ``vdiff fit -c recipe *extra`` in ``work`` (its own cache) beside ``background`` busy processes."""
    env = {**os.environ, "VDIFF_CACHE": str(work.parent / "cache")}
    vdiff = Path(sys.executable).with_name("vdiff")
    work.mkdir(parents=True, exist_ok=True)
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(background)]
    try:
        start = time.perf_counter()
        result = subprocess.run([str(vdiff), "fit", "-c", recipe, *extra], cwd=work, env=env, capture_output=True,
                                text=True)
        return time.perf_counter() - start, result
    finally:
        for process in busy:
            process.kill()
            process.wait()


def training_rate(run: Path, first: int, last: int) -> float:
    """Training steps/s between the logged steps ``first`` and ``last`` (the wall times of ``train/loss``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(run.glob("runs/*/version_*")))).Reload()
    points = [(e.step, e.wall_time) for e in events.Scalars("train/loss") if first <= e.step <= last]
    if len(points) < 2:
        raise RuntimeError(f"fewer than 2 logged training steps between {first} and {last} in {run}")
    (step0, time0), (step1, time1) = points[0], points[-1]
    return (step1 - step0) / (time1 - time0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "quickstart.yaml"))
    parser.add_argument("--target-seconds", type=float, default=300.0)
    parser.add_argument("--min-gain", type=float, default=3.0, help="target PSNR gain over copy-last, dB")
    parser.add_argument("--background", type=int, nargs="*", default=[],
                        help="also measure the training rate beside N busy processes, for each N given")
    parser.add_argument("--rate-steps", type=int, default=200,
                        help="steps the --background runs train (the rate is measured up to this step)")
    parser.add_argument("--rate-from", type=int, default=20, help="first step of the rate window (after warm-up)")
    parser.add_argument("fit_args", nargs=argparse.REMAINDER, help="after --: more `vdiff fit` arguments, every run")
    args = parser.parse_args()
    extra = [a for a in args.fit_args if a != "--"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "free"
        free_load = os.getloadavg()[0]
        seconds, result = fit(args.recipe, work, extra)
        if result.returncode != 0:
            print(result.stderr[-3000:])
            return result.returncode
        rows = {}
        for name in ("samples, mean of k=1", "copy last given frame"):
            match = re.search(rf"^{re.escape(name)}\s+([0-9.]+)\s+([0-9.]+)", result.stdout, re.MULTILINE)
            rows[name] = (float(match.group(1)), float(match.group(2))) if match else (float("nan"), float("nan"))
        steering = re.search(r"agreement \(both commands obeyed\): (\d+/\d+)", result.stdout)
        checkpoint = next(work.glob("runs/*/version_*/checkpoints/last.ckpt"))
        steps = int(torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)["global_step"])
        rates = []
        if args.background:
            free_rate = training_rate(work, args.rate_from, args.rate_steps)
            rates.append((0, free_load, free_rate))
            for n in args.background:
                run = Path(tmp) / f"background{n}"
                load = os.getloadavg()[0]
                _, loaded = fit(args.recipe, run, [*extra, "--trainer.max_steps", str(args.rate_steps)], background=n)
                if loaded.returncode != 0:
                    print(loaded.stderr[-3000:])
                    return loaded.returncode
                rates.append((n, load, training_rate(run, args.rate_from, args.rate_steps)))
    (psnr, ssim), (base_psnr, base_ssim) = rows["samples, mean of k=1"], rows["copy last given frame"]
    print(f"{'':<28}{'wall s':>8}{'steps':>8}{'PSNR dB':>10}{'SSIM':>8}")
    print(f"{Path(args.recipe).stem:<28}{seconds:>8.0f}{steps:>8d}{psnr:>10.2f}{ssim:>8.4f}")
    print(f"{'copy last given frame':<28}{'':>8}{'':>8}{base_psnr:>10.2f}{base_ssim:>8.4f}")
    if steering:
        print(f"steering test: {steering.group(1)} held-out clips turn both ways as commanded")
    print(f"gain {psnr - base_psnr:+.2f} dB, SSIM {ssim - base_ssim:+.4f} (target >= {args.min_gain:+.2f} dB); "
          f"wall {seconds:.0f} s (target <= {args.target_seconds:.0f} s: "
          f"{'met' if seconds <= args.target_seconds else 'MISSED'}); torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset (vdiff: PASSIVE)')}")
    if rates:
        free = rates[0][2]
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        print(f"\ntraining rate, steps {args.rate_from}-{args.rate_steps} ({cores} cores)")
        print(f"{'busy processes':>15}{'load before':>13}{'steps/s':>9}{'vs free':>9}{'target':>8}")
        for n, load, rate in rates:
            target = cores / (cores + n)
            verdict = "" if n == 0 else ("met" if rate / free >= target else "MISSED")
            print(f"{n:>15}{load:>13.2f}{rate:>9.2f}{rate / free:>9.2f}{target:>8.2f} {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
