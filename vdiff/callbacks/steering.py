"""The steering test: does the saved world model turn where it is told?

After ``fit``, :class:`SteeringTest` reloads the checkpoint Lightning just wrote (as
:class:`~vdiff.callbacks.checkpoint_eval.EvaluateCheckpoint` does: what is tested is what a user gets from disk, EMA
weights included when present), takes the given frames of the held-out clips, and samples each clip twice with the
same noise: once with the steering forced to ``+steering`` degrees (LEFT, vdiff's + = left) and once to
``-steering`` (RIGHT), on every frame and valid; every other action (speed, ...) stays as the clip recorded it. The
lateral scroll of the generated frames is measured with :func:`vdiff.metrics.steering.lateral_shift` (pixels per
frame, + = the picture moves right = the car turns left) over a band of rows, from the last given frame on, and a
table is printed:

* per command, the mean shift and how many clips move the commanded way (left: shift > 0; right: shift < 0);
* the clips that obey BOTH commands (the agreement, the number ``min_agreement`` checks);
* the clips whose left rollout lies left of their right one (``shift_left > shift_right``);
* for reference, the same measurement on the recorded clips against their own steering (how well the measurement
  reads real turns on this data; clips driving nearly straight are left out).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor

from vdiff.data import batch as B
from vdiff.metrics.steering import lateral_shift

STEERING = "steering"
STRAIGHT_DEG = 10.0  # recorded clips with |mean steering| below this count as straight (left out of the reference)


def with_steering(batch: dict[str, Any], degrees: float) -> dict[str, Any]:
    """A shallow copy of ``batch`` whose steering is ``degrees`` on every frame of every clip, marked valid (the
    other actions are kept)."""
    actions = dict(batch[B.ACTIONS])
    steering = actions[STEERING]
    actions[STEERING] = torch.full_like(steering, float(degrees))
    actions[B.valid_key(STEERING)] = torch.ones_like(actions[B.valid_key(STEERING)], dtype=torch.bool)
    return {**batch, B.ACTIONS: actions}


class SteeringTest(L.Callback):
    """At the end of ``fit``, roll the checkpoint out with steering forced left and right and print whether the
    generated frames turn the commanded way (module docstring).

    Args:
        steering: the commanded steering-wheel angle in degrees (+steering = left, -steering = right); keep it
            inside the training data's range.
        rows: the band of rows measured, ``(top, bottom)`` fractions of the height (e.g. around the horizon, where
            the yaw moves everything alike); None = the whole frame.
        max_batches: held-out batches to test (None = all).
        use_ema: test the EMA weights when the checkpoint has them.
        seed: the noise seed of batch ``b`` is ``seed + b``; both commands of a clip share it.
        max_shift: the largest shift searched, pixels per frame (None: a frame width / 8).
        min_agreement: if set, raise when fewer than this fraction of the clips obey both commands.
    """

    def __init__(
        self,
        steering: float = 150.0,
        rows: tuple[float, float] | None = None,
        max_batches: int | None = None,
        use_ema: bool = True,
        seed: int = 0,
        max_shift: float | None = None,
        min_agreement: float | None = None,
    ) -> None:
        super().__init__()
        if not steering > 0:
            raise ValueError(f"SteeringTest: steering must be a positive angle, got {steering}")
        if min_agreement is not None and not 0.0 <= min_agreement <= 1.0:
            raise ValueError(f"SteeringTest: min_agreement must be in [0, 1], got {min_agreement}")
        self.steering = float(steering)
        self.rows = tuple(rows) if rows is not None else None
        self.max_batches = max_batches
        self.use_ema = use_ema
        self.seed = int(seed)
        self.max_shift = max_shift
        self.min_agreement = min_agreement
        self.results: dict[str, float] = {}
        self.shifts: dict[str, Tensor] = {}
        self.given_frames: int | None = None
        self.num_frames: int | None = None

    # ---------------------------------------------------------------- the test itself

    @torch.no_grad()
    def evaluate(self, module: Any, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        """Run the test with ``module`` (anything with ``generate(batch, generator=...) -> Generated`` and an
        ``evaluation.given_frames``) on ``batches`` (on the module's device); fills :attr:`results` and
        :attr:`shifts` (per clip: ``left``, ``right``, ``recorded``, ``recorded_steering``) and returns the results."""
        given = self.given_frames = int(module.evaluation.given_frames)
        generated = slice(given - 1, None)  # from the last given frame: the first generated frame's move counts
        left, right, recorded, recorded_steering = [], [], [], []
        device = getattr(module, "device", torch.device("cpu"))
        for index, batch in enumerate(batches):
            if self.max_batches is not None and index >= self.max_batches:
                break
            if B.ACTIONS not in batch or STEERING not in batch[B.ACTIONS]:
                raise KeyError("SteeringTest: the held-out batches carry no steering actions")
            for sign, out in ((1.0, left), (-1.0, right)):
                generator = torch.Generator(device=device).manual_seed(self.seed + index)
                video = module.generate(with_steering(batch, sign * self.steering), generator=generator).video
                out.append(lateral_shift(video, self.rows, generated, self.max_shift).float().cpu())
                self.num_frames = int(video.shape[1])
            if B.VIDEO in batch:
                recorded.append(lateral_shift(batch[B.VIDEO], self.rows, generated, self.max_shift).float().cpu())
                steering = batch[B.ACTIONS][STEERING][:, given:].float()
                valid = batch[B.ACTIONS][B.valid_key(STEERING)][:, given:].all(dim=1)
                recorded_steering.append(torch.where(valid, steering.mean(dim=1), torch.nan).cpu())
        if not left:
            raise RuntimeError("SteeringTest: the held-out loader gave no clips")
        self.shifts = {"left": torch.cat(left), "right": torch.cat(right)}
        if recorded:
            self.shifts.update(recorded=torch.cat(recorded), recorded_steering=torch.cat(recorded_steering))
        self.results = summarize(self.shifts)
        return self.results

    def table(self, checkpoint: str | None = None, weights: str | None = None) -> str:
        """The printed report of :attr:`results` (after :meth:`evaluate`)."""
        if not self.results:
            raise RuntimeError("SteeringTest.table: run evaluate() first")
        return format_table(
            self.results, self.steering, self.rows, int(self.given_frames or 0), self.num_frames, checkpoint, weights
        )

    # ---------------------------------------------------------------- Lightning hook

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from vdiff.callbacks.checkpoint_eval import _has_ema, load_module

        callback = trainer.checkpoint_callback
        path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        if not path:
            raise RuntimeError("SteeringTest needs a ModelCheckpoint that saved a checkpoint (save_last: true)")
        module = load_module(path, map_location=pl_module.device, use_ema=self.use_ema)
        datamodule = trainer.datamodule

        def batches():
            for batch in datamodule.val_dataloader():
                batch = datamodule.transfer_batch_to_device(batch, pl_module.device, 0)
                yield datamodule.on_after_batch_transfer(batch, 0)

        self.evaluate(module, batches())
        if trainer.is_global_zero:
            weights = "EMA weights" if self.use_ema and _has_ema(path) else "trained weights"
            print(self.table(path, weights))
        self.check()

    def check(self) -> None:
        """Raise RuntimeError when the agreement of :attr:`results` is below ``min_agreement`` (if set)."""
        agreement = self.results["agreement"]
        if self.min_agreement is not None and agreement < self.min_agreement:
            raise RuntimeError(
                f"SteeringTest: {agreement:.2f} of the clips turn both ways as commanded, below min_agreement "
                f"{self.min_agreement}"
            )


def summarize(shifts: Mapping[str, Tensor]) -> dict[str, float]:
    """The test's numbers from per-clip shifts ``left``/``right`` (and optionally ``recorded`` with
    ``recorded_steering``): clip counts, fractions obeying each command and both, mean shifts."""
    left, right = shifts["left"], shifts["right"]
    n = int(left.numel())
    out = {
        "clips": float(n),
        "left_obeyed": float((left > 0).sum()),
        "right_obeyed": float((right < 0).sum()),
        "both_obeyed": float(((left > 0) & (right < 0)).sum()),
        "ordered": float((left > right).sum()),
        "mean_shift_left": float(left.mean()),
        "mean_shift_right": float(right.mean()),
    }
    out["agreement"] = out["both_obeyed"] / max(n, 1)
    if "recorded" in shifts:
        steering, moved = shifts["recorded_steering"], shifts["recorded"]
        turning = torch.isfinite(steering) & (steering.abs() >= STRAIGHT_DEG)
        out["recorded_turning"] = float(turning.sum())
        out["recorded_agree"] = float((torch.sign(moved[turning]) == torch.sign(steering[turning])).sum())
    return out


def format_table(
    results: Mapping[str, float],
    steering: float,
    rows: tuple[float, float] | None,
    given_frames: int,
    num_frames: int | None = None,
    checkpoint: str | None = None,
    weights: str | None = None,
) -> str:
    """The steering test as printed (see the module docstring)."""
    n = int(results["clips"])

    def frac(key: str, of: float | None = None) -> str:
        count, total = int(results[key]), int(of if of is not None else n)
        return f"{count}/{total} ({count / max(total, 1):.0%})"

    band = "all rows" if rows is None else f"rows {rows[0]:.0%}-{rows[1]:.0%} of the height"
    frames = (
        f"{given_frames} given -> {num_frames - given_frames}" if num_frames else f"{given_frames} given -> the rest"
    )
    lines = [
        f"Steering test on {n} held-out clips",
        f"  steering forced on every frame: LEFT +{steering:g} deg / RIGHT -{steering:g} deg (same start frames and "
        f"noise), {frames}",
        f"  lateral shift of the generated frames, {band}, px/frame, + = the picture moves right = turning left",
    ]
    if checkpoint:
        lines.append(f"  checkpoint: {checkpoint}" + (f" ({weights})" if weights else ""))
    lines += [
        f"  {'command':<18}{'mean shift':>12}   moves the commanded way",
        f"  {'left  +' + format(steering, 'g'):<18}{results['mean_shift_left']:>+12.3f}   {frac('left_obeyed')}",
        f"  {'right -' + format(steering, 'g'):<18}{results['mean_shift_right']:>+12.3f}   {frac('right_obeyed')}",
        f"  agreement (both commands obeyed): {frac('both_obeyed')} = {results['agreement']:.2f}",
        f"  left rollout left of the right one: {frac('ordered')}",
    ]
    if "recorded_turning" in results:
        lines.append(
            f"  reference, the recorded clips vs their own steering (|steering| >= {STRAIGHT_DEG:g} deg): "
            f"{frac('recorded_agree', results['recorded_turning'])} move the way they steer"
        )
    return "\n".join(lines)
