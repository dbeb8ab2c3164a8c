"""The steering test: does the saved world model turn where it is told?

After ``fit`` (by default; ``run_on`` adds ``vdiff validate`` / ``vdiff test``, where the module in memory is tested
on the stage's own held-out loader), :class:`SteeringTest` reloads the checkpoint Lightning just wrote (as
:class:`~vdiff.callbacks.checkpoint_eval.EvaluateCheckpoint` does: what is tested is what a user gets from disk, EMA
weights included when present), takes the given frames of the held-out clips, and samples each clip twice with the
same noise: once with the steering forced to ``+steering`` degrees (LEFT, vdiff's + = left) and once to
``-steering`` (RIGHT), on every frame and valid; the other actions stay as the clip recorded them (or only those
named in ``keep_actions``, e.g. speed, the rest marked absent). The
lateral scroll of the generated frames is measured with :func:`vdiff.metrics.steering.lateral_shift` (pixels per
frame, + = the picture moves right = the car turns left) over a band of rows, from the last given frame on, and a
table is printed:

* per command, the mean shift and how many clips move the commanded way (left: shift > 0; right: shift < 0);
* the clips that obey BOTH commands (the agreement, the number ``min_agreement`` checks);
* the clips whose left rollout lies left of their right one (``shift_left > shift_right``);
* for reference, the same measurement on the recorded clips against their own steering (how well the measurement
  reads real turns on this data; clips driving nearly straight are left out).

The forced commands are always sampled WITH actions: a module sampling action-free (``VistaModule(sample_actions=
False)``, as an action-free FID/FVD protocol) has them switched on for the test by its ``actions_sampled`` context.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from vdiff.data import batch as B
from vdiff.lit.checkpointing import has_ema_weights
from vdiff.lit.module_loading import load_module
from vdiff.lit.progress import phase_progress
from vdiff.metrics.steering import lateral_shift

STEERING = "steering"
STRAIGHT_DEG = 10.0  # recorded clips with |mean steering| below this count as straight (left out of the reference)
STAGES = ("fit", "validate", "test")  # the entry points of ``run_on`` (Lightning's TrainerFn values)


def with_steering(batch: dict[str, Any], degrees: float, keep: Sequence[str] | None = None) -> dict[str, Any]:
    """A shallow copy of ``batch`` whose steering is ``degrees`` on every frame of every clip, marked valid. The
    other recorded actions are kept (``keep=None``), or only those named in ``keep`` (e.g. ``("speed",)``): the rest
    are marked invalid, i.e. absent (so a recorded trajectory, command or goal cannot contradict the command)."""
    actions = dict(batch[B.ACTIONS])
    steering = actions[STEERING]
    actions[STEERING] = torch.full_like(steering, float(degrees))
    actions[B.valid_key(STEERING)] = torch.ones_like(actions[B.valid_key(STEERING)], dtype=torch.bool)
    if keep is not None:
        for key in list(actions):
            if key != STEERING and key not in keep and B.valid_key(key) in actions:
                actions[B.valid_key(key)] = torch.zeros_like(actions[B.valid_key(key)], dtype=torch.bool)
    return {**batch, B.ACTIONS: actions}


class SteeringTest(L.Callback):
    """At the end of ``fit`` (and/or ``validate`` / ``test``, see ``run_on``), roll the world model out with steering
    forced left and right and print whether the generated frames turn the commanded way (module docstring).

    Args:
        steering: the commanded steering-wheel angle in degrees (+steering = left, -steering = right); keep it
            inside the training data's range.
        rows: the band of rows measured, ``(top, bottom)`` fractions of the height (e.g. around the horizon, where
            the yaw moves everything alike); None = the whole frame.
        max_batches: held-out batches to test (None = all).
        use_ema: test the EMA weights when the checkpoint has them (``"fit"`` only).
        seed: the noise seed of batch ``b`` is ``seed + b``; both commands of a clip share it.
        max_shift: the largest shift searched, pixels per frame (None: a frame width / 8).
        min_agreement: if set, raise when fewer than this fraction of the clips obey both commands.
        run_on: the trainer entry points that run the test, any of ``"fit"``, ``"validate"``, ``"test"`` (default
            ``("fit",)``). ``"fit"``: at the end of ``fit``, on the checkpoint Lightning just wrote, reloaded (EMA
            weights per ``use_ema``), over the val loader. ``"validate"`` / ``"test"``: at the end of
            ``trainer.validate`` / ``trainer.test`` (never during fit's periodic validation or its sanity check), on
            the module as it is in memory (eval mode, under the trainer's precision; ``use_ema`` does not apply: the
            weights in the module when this hook runs; an ``EMA`` callback listed before this one has swapped its
            weights out again), over the val / test loader; the numbers are also written to the trainer's loggers as
            ``steering/agreement``, ``steering/left_obeyed_frac`` and ``steering/right_obeyed_frac``. The loader is
            the datamodule's, else the one given to the trainer.
        keep_actions: the recorded actions kept beside the forced steering (None: all of them); the others are
            marked invalid (absent). Vista pairs steering with speed alone (``["speed"]``): on real data a recorded
            trajectory, command or goal describes the recorded path and would contradict the command.
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
        run_on: Sequence[Literal["fit", "validate", "test"]] = ("fit",),
        keep_actions: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        run_on = (run_on,) if isinstance(run_on, str) else tuple(run_on)
        if unknown := [stage for stage in run_on if stage not in STAGES]:
            raise ValueError(f"SteeringTest: run_on must name stages among {STAGES}, got {unknown}")
        if not steering > 0:
            raise ValueError(f"SteeringTest: steering must be a positive angle, got {steering}")
        if min_agreement is not None and not 0.0 <= min_agreement <= 1.0:
            raise ValueError(f"SteeringTest: min_agreement must be in [0, 1], got {min_agreement}")
        self.run_on = run_on
        self.keep_actions = tuple(keep_actions) if keep_actions is not None else None
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
        :attr:`shifts` (per clip: ``left``, ``right``, ``recorded``, ``recorded_steering``) and returns the results.
        A module with ``actions_sampled`` (``VistaModule``) samples inside ``module.actions_sampled(True)``."""
        given = self.given_frames = int(module.evaluation.given_frames)
        generated = slice(given - 1, None)  # from the last given frame: the first generated frame's move counts
        left, right, recorded, recorded_steering = [], [], [], []
        device = getattr(module, "device", torch.device("cpu"))
        with_actions = getattr(module, "actions_sampled", None)  # VistaModule: forced steering sampled WITH actions
        with with_actions(True) if with_actions is not None else nullcontext():
            for index, batch in enumerate(batches):
                if self.max_batches is not None and index >= self.max_batches:
                    break
                if B.ACTIONS not in batch or STEERING not in batch[B.ACTIONS]:
                    raise KeyError("SteeringTest: the held-out batches carry no steering actions")
                for sign, out in ((1.0, left), (-1.0, right)):
                    generator = torch.Generator(device=device).manual_seed(self.seed + index)
                    video = module.generate(with_steering(batch, sign * self.steering, self.keep_actions),
                                            generator=generator).video
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

    # ---------------------------------------------------------------- Lightning hooks

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "fit" not in self.run_on:
            return
        callback = trainer.checkpoint_callback
        path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        if not path:
            raise RuntimeError("SteeringTest needs a ModelCheckpoint that saved a checkpoint (save_last: true)")
        module = load_module(path, map_location=pl_module.device, use_ema=self.use_ema)
        total = held_out_batches(trainer, "validate")
        if self.max_batches is not None and total is not None:
            total = min(total, self.max_batches)
        batches = held_out(trainer, "validate", pl_module.device)
        with phase_progress(trainer, batches, "Steering test on held-out clips", total=total) as batches:
            self.evaluate(module, batches)
        if trainer.is_global_zero:
            weights = "EMA weights" if self.use_ema and has_ema_weights(path) else "trained weights"
            print(self.table(path, weights))
        self.check()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run_in_memory(trainer, pl_module, "validate")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run_in_memory(trainer, pl_module, "test")

    def _run_in_memory(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """The ``validate`` / ``test`` entry point: the module in memory, the stage's loader, table, loggers, check."""
        if stage not in self.run_on or trainer.state.fn != stage or trainer.sanity_checking:
            return  # not selected, or fit's periodic validation / sanity check
        was_training = pl_module.training
        pl_module.eval()
        try:
            with trainer.precision_plugin.forward_context():
                self.evaluate(pl_module, held_out(trainer, stage, pl_module.device))
        finally:
            pl_module.train(was_training)
        if trainer.is_global_zero:
            print(self.table(trainer.ckpt_path, "weights in memory"))
            clips = max(self.results["clips"], 1.0)
            metrics = {
                "steering/agreement": self.results["agreement"],
                "steering/left_obeyed_frac": self.results["left_obeyed"] / clips,
                "steering/right_obeyed_frac": self.results["right_obeyed"] / clips,
            }
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        self.check()

    def check(self) -> None:
        """Raise RuntimeError when the agreement of :attr:`results` is below ``min_agreement`` (if set)."""
        agreement = self.results["agreement"]
        if self.min_agreement is not None and agreement < self.min_agreement:
            raise RuntimeError(
                f"SteeringTest: {agreement:.2f} of the clips turn both ways as commanded, below min_agreement "
                f"{self.min_agreement}"
            )


def held_out(trainer: L.Trainer, stage: str, device: torch.device) -> Iterator[dict[str, Any]]:
    """The batches of the trainer's held-out loader for ``stage`` (``"test"``: the test loader, else the val loader),
    on ``device``: the datamodule's loader and batch hooks, or without a datamodule the loaders given to the trainer
    and the module's hooks."""
    hooks, loaders = _held_out_loaders(trainer, stage)
    for index, loader in enumerate(loaders):
        for batch in loader:
            batch = hooks.on_before_batch_transfer(batch, index)
            batch = hooks.transfer_batch_to_device(batch, device, index)
            yield hooks.on_after_batch_transfer(batch, index)


def held_out_batches(trainer: L.Trainer, stage: str) -> int | None:
    """How many batches :func:`held_out` gives for ``stage``, when its loaders know (else None)."""
    try:
        return sum(len(loader) for loader in _held_out_loaders(trainer, stage)[1])
    except TypeError:
        return None


def _held_out_loaders(trainer: L.Trainer, stage: str) -> tuple[Any, list]:
    """``(batch hooks, loaders)`` of :func:`held_out`."""
    test = stage == "test"
    if (datamodule := trainer.datamodule) is not None:
        hooks, loaders = datamodule, datamodule.test_dataloader() if test else datamodule.val_dataloader()
    else:
        hooks, loaders = trainer.lightning_module, trainer.test_dataloaders if test else trainer.val_dataloaders
    if loaders is None:
        raise RuntimeError(f"SteeringTest: the trainer has no {'test' if test else 'validation'} loader")
    return hooks, list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]


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
    elif weights:
        lines.append(f"  tested: {weights}")
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
