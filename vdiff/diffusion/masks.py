"""Conditioning masks over (T, H, W): which elements of a clip are given and which are generated.

Convention (docs/architecture.md): a mask is a bool tensor ``(B, T, 1, H, W)``, **true = given** (clean
content the model conditions on), false = to generate. The VDT code uses the opposite convention
(int, 1 = generate); convert at its border with ``~given_mask``.

Modes (VDT's unified mask modelling, with parameters that scale to any clip length T):

``prediction``      the first k frames given (``given_frames``: an int k, or a fraction of T).
``backward``        the last k frames given.
``interpolation``   every ``step``-th frame given, the first and the last frame always included.
``unconditional``   nothing given.
``single_frame``    one frame given (``frame``: index, default 0 = image-to-video; None = a random
                    frame per clip, as VDT's code does).
``random_frames``   each frame generated with probability ``p_generate`` (VDT's ``mlm_ratio = 0.8``
                    in ``mask_generator.py`` is the probability that a frame is *generated*: a frame is
                    masked, 1 = generate, when ``random() < 0.8``). At least one frame is generated.
``completion``      spatial-temporal completion: one rectangle covering ``spatial_ratio`` of the
                    frame area (random aspect in [0.3, 1/0.3], random position) is generated on a
                    span of frames; everything else is given. The span is ``span`` = (start, end) or,
                    when None, the clip with up to ``max_span_trim`` (a fraction of T) frames trimmed
                    at each end at random (VDT: 0..3 of 16 frames).

Fixes of the reference generator: its span ``mask[start:-end]`` is empty when ``end == 0`` (ours
never is); k and the interpolation step were fixed for 16-frame clips (ours accept fractions and are
validated against T with clear errors); its loss averaged over all elements (the losses in
:mod:`vdiff.diffusion.ddpm` average over generated ones). Every mode generates something;
every mode gives something except ``unconditional`` (nothing) and ``random_frames`` (which, like
VDT's, may draw a clip with no given frame: an unconditional sample).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch
from torch import Tensor

__all__ = ["MASK_MODES", "MaskMixture", "MaskSpec", "sample_given_mask", "task_mask"]

MaskMode = Literal["prediction", "backward", "interpolation", "unconditional", "single_frame", "random_frames", "completion"]
MASK_MODES: tuple[str, ...] = ("prediction", "backward", "interpolation", "unconditional", "single_frame", "random_frames", "completion")


@dataclass(frozen=True)
class MaskSpec:
    """One mask mode and its parameters (only those of its mode matter; all are validated).

    given_frames: prediction/backward, an int k >= 1 or a fraction in (0, 1) of T (rounded, kept
    within [1, T - 1]); VDT's 8 of 16 is 0.5. step: interpolation stride >= 2. frame: single_frame
    index (negative counts from the end) or None = random. p_generate: random_frames, probability
    that a frame is generated, in (0, 1]. spatial_ratio: completion, area fraction of the generated
    rectangle, in (0, 1). span: completion, explicit [start, end) frames, or None. max_span_trim:
    completion with span None, the most frames trimmed at each end as a fraction of T, in [0, 0.5).
    """

    mode: MaskMode
    given_frames: int | float = 0.5
    step: int = 4
    frame: int | None = 0
    p_generate: float = 0.8
    spatial_ratio: float = 0.5
    span: tuple[int, int] | None = None
    max_span_trim: float = 0.2

    def __post_init__(self) -> None:
        where = f"MaskSpec(mode={self.mode!r})"
        if self.mode not in MASK_MODES:
            raise ValueError(f"MaskSpec: mode must be one of {MASK_MODES}, got {self.mode!r}")
        k = self.given_frames
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            raise TypeError(f"{where}: given_frames must be an int or a float fraction, got {k!r}")
        if isinstance(k, int) and k < 1:
            raise ValueError(f"{where}: given_frames must be >= 1 frames, got {k}")
        if isinstance(k, float) and not 0.0 < k < 1.0:
            raise ValueError(f"{where}: a fractional given_frames must be in (0, 1), got {k}")
        if not isinstance(self.step, int) or self.step < 2:
            raise ValueError(f"{where}: step must be an int >= 2 (step 1 would give every frame), got {self.step!r}")
        if self.frame is not None and not isinstance(self.frame, int):
            raise TypeError(f"{where}: frame must be an int or None, got {self.frame!r}")
        if not 0.0 < self.p_generate <= 1.0:
            raise ValueError(f"{where}: p_generate must be in (0, 1], got {self.p_generate}")
        if not 0.0 < self.spatial_ratio < 1.0:
            raise ValueError(f"{where}: spatial_ratio must be in (0, 1), got {self.spatial_ratio}")
        if self.span is not None and (
            len(self.span) != 2 or not all(isinstance(s, int) for s in self.span) or not 0 <= self.span[0] < self.span[1]
        ):
            raise ValueError(f"{where}: span must be (start, end) ints with 0 <= start < end, got {self.span!r}")
        if not 0.0 <= self.max_span_trim < 0.5:
            raise ValueError(f"{where}: max_span_trim must be in [0, 0.5), got {self.max_span_trim}")

    def num_given_frames(self, num_frames: int) -> int:
        """k for prediction/backward at clip length T (validated: 1 <= k <= T - 1)."""
        if num_frames < 2:
            raise ValueError(f"MaskSpec(mode={self.mode!r}): needs at least 2 frames, got num_frames={num_frames}")
        if isinstance(self.given_frames, float):
            return min(max(round(self.given_frames * num_frames), 1), num_frames - 1)
        if self.given_frames > num_frames - 1:
            raise ValueError(
                f"MaskSpec(mode={self.mode!r}): given_frames={self.given_frames} leaves nothing to generate "
                f"in a {num_frames}-frame clip (must be <= {num_frames - 1}; or give a fraction of T)"
            )
        return self.given_frames


def _check_size(num_frames: int, height: int, width: int, batch: int) -> None:
    for name, value in (("batch", batch), ("num_frames", num_frames), ("height", height), ("width", width)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"masks: {name} must be a positive int, got {value!r}")


def _frame_mask(given_frames: Tensor, height: int, width: int) -> Tensor:
    """(B, T) bool -> (B, T, 1, H, W) bool."""
    batch, frames = given_frames.shape
    return given_frames.reshape(batch, frames, 1, 1, 1).expand(batch, frames, 1, height, width).clone()


def _uniform_int(low: int, high: int, generator: torch.Generator | None) -> int:
    """An int uniform in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


def _block_size(area_ratio: float, aspect: float, height: int, width: int) -> tuple[int, int]:
    """(h, w) of a rectangle of about ``area_ratio * H * W`` elements and aspect h/w, fitting the frame."""
    area = area_ratio * height * width
    h = min(max(round(math.sqrt(area * aspect)), 1), height)
    w = min(max(round(area / h), 1), width)
    h = min(max(round(area / w), 1), height)
    return h, w


def _completion_span(spec: MaskSpec, num_frames: int, generator: torch.Generator | None, random_span: bool) -> tuple[int, int]:
    if spec.span is not None:
        if spec.span[1] > num_frames:
            raise ValueError(f"MaskSpec(mode='completion'): span {spec.span} ends past the clip's {num_frames} frames")
        return spec.span
    if not random_span:
        return 0, num_frames
    trim = int(math.floor(spec.max_span_trim * num_frames + 0.5))
    trim = min(trim, (num_frames - 1) // 2)
    start = _uniform_int(0, trim, generator)
    end = num_frames - _uniform_int(0, trim, generator)
    return start, end


def _completion_masks(
    spec: MaskSpec, batch: int, num_frames: int, height: int, width: int, generator: torch.Generator | None, random: bool
) -> Tensor:
    if height * width < 2:
        raise ValueError(f"MaskSpec(mode='completion'): needs frames of at least 2 elements, got {height}x{width}")
    given = torch.ones(batch, num_frames, 1, height, width, dtype=torch.bool)
    for b in range(batch):
        start, end = _completion_span(spec, num_frames, generator, random)
        if random:
            log_aspect = math.log(0.3) + (math.log(1 / 0.3) - math.log(0.3)) * float(torch.rand((), generator=generator))
            h, w = _block_size(spec.spatial_ratio, math.exp(log_aspect), height, width)
            top = _uniform_int(0, height - h, generator)
            left = _uniform_int(0, width - w, generator)
        else:
            h = min(max(round(height * math.sqrt(spec.spatial_ratio)), 1), height)
            w = min(max(round(width * math.sqrt(spec.spatial_ratio)), 1), width)
            top, left = (height - h) // 2, (width - w) // 2
        if h == height and w == width:  # the rectangle must not cover the whole frame: keep a column given
            if w > 1:
                w -= 1
            else:
                h -= 1
        given[b, start:end, :, top : top + h, left : left + w] = False
    return given


def _sample_mask(
    spec: MaskSpec, batch: int, num_frames: int, height: int, width: int, generator: torch.Generator | None, random: bool
) -> Tensor:
    """CPU bool mask (B, T, 1, H, W) for one spec; ``random`` False = the deterministic task version."""
    _check_size(num_frames, height, width, batch)
    mode = spec.mode
    frames = torch.zeros(batch, num_frames, dtype=torch.bool)
    if mode == "unconditional":
        return _frame_mask(frames, height, width)
    if mode == "completion":
        return _completion_masks(spec, batch, num_frames, height, width, generator, random)
    if num_frames < 2:
        raise ValueError(f"MaskSpec(mode={mode!r}): needs at least 2 frames to give one and generate one, got num_frames={num_frames}")
    if mode == "prediction":
        frames[:, : spec.num_given_frames(num_frames)] = True
    elif mode == "backward":
        frames[:, num_frames - spec.num_given_frames(num_frames) :] = True
    elif mode == "interpolation":
        if num_frames < 3:
            raise ValueError(f"MaskSpec(mode='interpolation'): needs at least 3 frames (first and last are given), got {num_frames}")
        frames[:, :: spec.step] = True
        frames[:, -1] = True
    elif mode == "single_frame":
        if spec.frame is None:
            index = torch.randint(0, num_frames, (batch,), generator=generator) if random else torch.zeros(batch, dtype=torch.long)
            frames[torch.arange(batch), index] = True
        else:
            if not -num_frames <= spec.frame < num_frames:
                raise ValueError(f"MaskSpec(mode='single_frame'): frame {spec.frame} is outside a {num_frames}-frame clip")
            frames[:, spec.frame] = True
    elif mode == "random_frames":
        frames = torch.rand(batch, num_frames, generator=generator) >= spec.p_generate
        all_given = frames.all(dim=1)
        if bool(all_given.any()):  # keep one frame to generate
            index = torch.randint(0, num_frames, (batch,), generator=generator)
            frames[all_given, index[all_given]] = False
    return _frame_mask(frames, height, width)


def sample_given_mask(
    spec: MaskSpec,
    batch: int,
    num_frames: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw ``batch`` masks of one mode: bool ``(B, T, 1, H, W)``, true = given.

    Random parts (random frames, completion rectangles and spans, a random single frame) are drawn
    per clip from ``generator`` (a CPU generator; None = the global RNG); the mask is then moved to
    ``device``. Raises ValueError when the mode cannot give and generate in a clip of this size.
    """
    return _sample_mask(spec, batch, num_frames, height, width, generator, random=True).to(device)


def task_mask(
    name: str | MaskSpec,
    num_frames: int,
    height: int,
    width: int,
    *,
    batch: int = 1,
    device: torch.device | str | None = None,
    seed: int = 0,
    **params: object,
) -> Tensor:
    """A deterministic mask for validation/evaluation tasks: bool ``(batch, T, 1, H, W)``.

    ``name`` is a mode (or a MaskSpec); ``params`` override MaskSpec fields, e.g.
    ``task_mask("prediction", 30, 16, 16, given_frames=2)`` (condition on 2 frames, predict 28).
    completion uses a centred rectangle of ``spatial_ratio`` of the area with the frame's aspect on
    ``span`` (default all frames); single_frame with ``frame=None`` gives frame 0; random_frames draws
    from a generator seeded with ``seed`` (same mask for every clip of the batch).
    """
    if isinstance(name, MaskSpec):
        spec = replace(name, **params) if params else name  # type: ignore[arg-type]
    else:
        known = {f.name for f in fields(MaskSpec)} - {"mode"}
        unknown = set(params) - known
        if unknown:
            raise TypeError(f"task_mask: unknown parameters {sorted(unknown)} for MaskSpec; known: {sorted(known)}")
        spec = MaskSpec(mode=name, **params)  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(seed)
    one = _sample_mask(spec, 1, num_frames, height, width, generator, random=False)
    return one.expand(batch, -1, -1, -1, -1).clone().to(device)


class MaskMixture:
    """Draws one mask mode per clip from weighted specs (VDT trains on such a mixture).

    weights: ``{name: weight}`` (non-negative, not all zero). specs: ``{name: MaskSpec}``; a name
    missing from ``specs`` must be a mode name and gets that mode's default spec. Several names may
    share a mode with different parameters (e.g. "predict2" and "predict_half").
    """

    def __init__(self, weights: Mapping[str, float], specs: Mapping[str, MaskSpec] | None = None) -> None:
        specs = dict(specs or {})
        if not weights:
            raise ValueError("MaskMixture: weights must name at least one mode")
        unused = set(specs) - set(weights)
        if unused:
            raise ValueError(f"MaskMixture: specs {sorted(unused)} have no weight; weights name {sorted(weights)}")
        self.names: list[str] = []
        self.specs: list[MaskSpec] = []
        values: list[float] = []
        for name, weight in weights.items():
            weight = float(weight)
            if not weight >= 0.0 or math.isinf(weight):
                raise ValueError(f"MaskMixture: weight of {name!r} must be a finite number >= 0, got {weight}")
            if name in specs:
                spec = specs[name]
                if not isinstance(spec, MaskSpec):
                    raise TypeError(f"MaskMixture: specs[{name!r}] must be a MaskSpec, got {type(spec).__name__}")
            elif name in MASK_MODES:
                spec = MaskSpec(mode=name)  # type: ignore[arg-type]
            else:
                raise ValueError(f"MaskMixture: {name!r} is not a mask mode ({MASK_MODES}) and has no spec in specs")
            self.names.append(name)
            self.specs.append(spec)
            values.append(weight)
        self.weights = torch.tensor(values, dtype=torch.float64)
        if float(self.weights.sum()) <= 0.0:
            raise ValueError(f"MaskMixture: weights must not all be zero, got {dict(weights)}")

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: {float(w):g}" for n, w in zip(self.names, self.weights))
        return f"MaskMixture({{{parts}}})"

    def sample(
        self,
        batch: int,
        num_frames: int,
        height: int,
        width: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, list[str]]:
        """Masks ``(B, T, 1, H, W)`` (true = given) and the name drawn for each clip."""
        _check_size(num_frames, height, width, batch)
        choice = torch.multinomial(self.weights, batch, replacement=True, generator=generator)
        masks = torch.empty(batch, num_frames, 1, height, width, dtype=torch.bool)
        for index in choice.unique().tolist():
            rows = (choice == index).nonzero().flatten()
            masks[rows] = _sample_mask(self.specs[index], rows.numel(), num_frames, height, width, generator, random=True)
        return masks.to(device), [self.names[i] for i in choice.tolist()]

    def __call__(
        self,
        batch: int,
        num_frames: int,
        height: int,
        width: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Masks ``(B, T, 1, H, W)``, true = given (see :meth:`sample` for the drawn names)."""
        return self.sample(batch, num_frames, height, width, generator, device)[0]
