"""The evaluation protocol every diffusion module shares: what is scored, aggregated and printed.

:class:`EvalProtocol` says how a number was obtained (task, given frames, clip length, ``k`` samples
per clip and their seeds); :class:`ScoreTotals` sums per-clip scores and merges them across ranks
with exact clip counts; :func:`format_report` prints a result under its protocol and sampler. The
base LightningModule's ``test`` and the :class:`~vdiff.callbacks.checkpoint_eval.EvaluateCheckpoint`
callback both use these three, so every vdiff result reads the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from vdiff.diffusion.masks import MASK_MODES
from vdiff.diffusion.sampling import SamplerConfig

SAMPLE_SEED_STRIDE = 1_000_003  # seed of sample j of batch b: seed + b + j * stride (distinct while b < stride)
FVD_FRAMES = ("generated", "all")
# The per-clip scores of the protocol (evaluate_protocol_batch), in the order ranks reduce them.
PROTOCOL_SCORES = ("psnr", "psnr_best_of_k", "psnr_copy_last", "ssim", "ssim_best_of_k", "ssim_copy_last")
PREDICTION_TASKS = ("prediction", "backward")


@dataclass
class EvalProtocol:
    """How validation and test results are obtained; printed with every result.

    task:              the evaluation task, a mask mode (Cityscapes: ``prediction``).
    given_frames:      frames given to the model (prediction/backward; Cityscapes: 2).
    num_frames:        frames of every test clip (the first ``num_frames`` of the data's clip);
                       None = the data's clip length (Cityscapes: 30, i.e. 2 -> 28).
    samples_per_video: k, samples drawn per test clip; metrics are the mean over the k samples and
                       the best of the k (MCVD/VDT report SSIM best-of-k). Validation draws 1.
    seed:              sample ``j`` of batch ``b`` uses the seed ``seed + b + j * 1_000_003``
                       (validation uses sample 0, so its noise is the same every epoch).
    fvd_frames:        which frames would enter FVD: ``"generated"`` (only the predicted frames) or
                       ``"all"`` (given frames included).
    """

    task: str = "prediction"
    given_frames: int = 2
    num_frames: int | None = None
    samples_per_video: int = 1
    seed: int = 0
    fvd_frames: Literal["generated", "all"] = "generated"

    def __post_init__(self) -> None:
        if self.task not in MASK_MODES:
            raise ValueError(f"EvalProtocol: task must be one of {MASK_MODES}, got {self.task!r}")
        if self.samples_per_video < 1:
            raise ValueError(f"EvalProtocol: samples_per_video must be >= 1, got {self.samples_per_video}")
        if self.fvd_frames not in FVD_FRAMES:
            raise ValueError(f"EvalProtocol: fvd_frames must be one of {FVD_FRAMES}, got {self.fvd_frames!r}")
        if self.num_frames is not None and self.num_frames < 2:
            raise ValueError(f"EvalProtocol: num_frames must be >= 2 or null, got {self.num_frames}")
        if self.task in PREDICTION_TASKS and self.given_frames < 1:
            raise ValueError(f"EvalProtocol: given_frames must be >= 1 for {self.task}, got {self.given_frames}")
        if self.num_frames is not None and self.task in PREDICTION_TASKS and self.num_frames <= self.given_frames:
            raise ValueError(
                f"EvalProtocol: num_frames={self.num_frames} leaves nothing to generate with "
                f"given_frames={self.given_frames}"
            )

    def sample_seed(self, batch_idx: int, sample: int) -> int:
        """The seed of sample ``sample`` (0..k-1) of batch ``batch_idx``; sample 0 is validation's seed."""
        return self.seed + batch_idx + sample * SAMPLE_SEED_STRIDE

    def describe(self, sampler: SamplerConfig, clips: int | None = None) -> str:
        """A paragraph naming every choice behind a result (and the number of clips when known)."""
        frames = "the data's clip length" if self.num_frames is None else f"{self.num_frames}"
        if self.task in PREDICTION_TASKS:
            generated = "the rest" if self.num_frames is None else f"{self.num_frames - self.given_frames}"
            task = f"{self.task} {self.given_frames} -> {generated} frames"
        else:
            task = self.task
        fvd = "generated frames only" if self.fvd_frames == "generated" else "all frames (given included)"
        return "\n".join(
            [
                f"task: {task}; frames per clip: {frames}" + (f"; clips: {clips}" if clips is not None else ""),
                f"samples per video: k={self.samples_per_video} (seeds {self.seed} + batch + j*{SAMPLE_SEED_STRIDE}); "
                f"sampler: {sampler.describe()}",
                "metrics: PSNR/SSIM on generated frames only, per clip the mean over the k samples and the best "
                "of k; copy-last-given-frame baseline beside them",
                f"FVD frames: {fvd} (FVD/FID: the VideoQuality callback or `vdiff evaluate`, with local I3D/Inception "
                "weights)",
            ]
        )


class ScoreTotals:
    """Running sums of per-clip scores and the number of clips, merged exactly across ranks.

    ``add({"psnr": (B,), ...})`` per batch; :meth:`means` sums over every rank (each rank scores its
    own clips once: vdiff's evaluation loaders never pad) and divides by the total clip count.
    """

    def __init__(self, names: tuple[str, ...] = PROTOCOL_SCORES) -> None:
        # Every rank reduces the same names in the same order, also one that scored no clip.
        self.sums: dict[str, float] = {name: 0.0 for name in names}
        self.clips = 0

    def add(self, scores: dict[str, Tensor]) -> None:
        sizes = {int(v.numel()) for v in scores.values()}
        if len(sizes) != 1:
            raise ValueError(f"ScoreTotals.add: every score must have one value per clip, got sizes {sizes}")
        for name, values in scores.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(values.detach().double().sum())
        self.clips += sizes.pop()

    def means(self, reduce: Any = None, device: torch.device | str = "cpu") -> dict[str, float]:
        """Per-clip means over all ranks plus ``"clips"``. ``reduce``: a function summing a float64
        tensor across ranks (e.g. ``partial(strategy.reduce, reduce_op="sum")``), None on one process."""
        names = sorted(self.sums)
        totals = torch.tensor([self.clips] + [self.sums[k] for k in names], dtype=torch.float64, device=device)
        if reduce is not None:
            totals = reduce(totals)
        clips = int(totals[0])
        results = {k: float(v) / max(clips, 1) for k, v in zip(names, totals[1:].tolist())}
        results["clips"] = clips
        return results


def format_report(
    title: str,
    results: dict[str, float],
    protocol: EvalProtocol,
    sampler: SamplerConfig,
    checkpoint: str | None = None,
    notes: str | None = None,
) -> str:
    """The result table under the protocol that produced it. ``results`` as :meth:`ScoreTotals.means`
    returns from ``evaluate_protocol_batch`` scores (psnr, ssim, *_best_of_k, *_copy_last, clips)."""
    clips = int(results.get("clips", 0))
    lines = ["", f"{title} ({clips} clips)"]
    if checkpoint:
        lines.append(f"checkpoint: {checkpoint}")
    if notes:
        lines.append(notes)
    lines += ["protocol:", protocol.describe(sampler, clips=clips)]
    if clips == 0:
        return "\n".join(lines + ["no clips were scored (empty loader)", ""])
    k = protocol.samples_per_video
    rows = [
        (f"samples, mean of k={k}", results["psnr"], results["ssim"]),
        (f"samples, best of k={k}", results["psnr_best_of_k"], results["ssim_best_of_k"]),
        ("copy last given frame", results["psnr_copy_last"], results["ssim_copy_last"]),
    ]
    lines.append(f"{'':<28}{'PSNR (dB)':>12}{'SSIM':>10}")
    lines += [f"{name:<28}{psnr:>12.2f}{ssim:>10.4f}" for name, psnr, ssim in rows]
    gain_psnr = results["psnr"] - results["psnr_copy_last"]
    gain_ssim = results["ssim"] - results["ssim_copy_last"]
    lines += [f"{'gain (mean - copy last)':<28}{gain_psnr:>+12.2f}{gain_ssim:>+10.4f}", ""]
    return "\n".join(lines)
