"""SVD's conditioning, as small modules and functions: CLIP image embedding, micro-conditioning values, the
concat latent, and what classifier-free guidance drops.

From one conditioning frame ``frame`` ``(B, 3, H, W)`` in [-1, 1] (the first frame of a clip of ``T`` latent
frames) Stable Video Diffusion gives its UNet three conditions (sgm ``configs/inference/svd.yaml``, diffusers
``StableVideoDiffusionPipeline``):

=====================  ===================  ===============================================================
cond key               shape                what
=====================  ===================  ===============================================================
``context``            ``(B, 1, 1024)``     CLIP image embedding of the CLEAN frame (:class:`CLIPImageEmbedder`:
                                            OpenCLIP ViT-H/14 image tower + projection to 1024, one token)
``concat``             ``(B, T, 4, h, w)``  autoencoder posterior MODE of the NOISY frame
                                            ``frame + cond_aug * N(0, 1)``, NOT multiplied by the latent scale
                                            factor, repeated over the ``T`` frames (:func:`concat_condition`)
``added_time_ids``     ``(B, 3)``           raw ``(fps_id, motion_bucket_id, cond_aug)`` (:func:`added_time_ids`);
                                            the UNet embeds each with a 256-d sinusoid (it owns that embedding)
=====================  ===================  ===============================================================

Micro-conditioning: what the three numbers mean
-----------------------------------------------

``fps_id``
    **Frames per second of the clip, minus one.** SVD was trained with ``fps_id = fps - 1``: sgm's sampling
    scripts take ``fps_id`` (default 6) and write the result at ``fps_id + 1`` frames per second; diffusers'
    pipeline takes ``fps`` (default 7) and passes ``fps - 1`` ("SVD's UNet was micro-conditioned on fps-1").
    sgm warns below ``fps_id`` 5 and above 30, the range it was trained on. vdiff derives it from the clip's frame
    rate *as sampled* (the batch's ``fps``, which accounts for any frame stride): :func:`fps_id_from_fps`. It is
    not rounded: the sinusoidal embedding is continuous, and e.g. 12.5 fps is 11.5.
``motion_bucket_id``
    **How much the clip moves, as a bucket 0..255** (higher = more motion; SVD's default 127 is the middle).
    Stability computed an optical-flow score per training clip and bucketed it, but never published the
    mapping. vdiff's curation (:mod:`vdiff.data.convert.curation`, ``motion_score``) stores the clip's mean
    Farneback flow magnitude in the sample json as ``extra["motion_score"]`` (with its units, ``extra["motion_fps"]``
    and ``extra["motion_size"]``: pixels at a ``motion_size``-pixel shorter side per ``1 / motion_fps`` seconds),
    and :class:`MotionBuckets` maps that score to a bucket: a monotone piecewise-linear map fitted by quantiles
    over a shard set (:func:`fit_motion_buckets`), so that the 256 buckets are equally populated on that set
    (its JSON file: :mod:`vdiff.data.motion_buckets`). :data:`DEFAULT_MOTION_BUCKETS` is a documented fallback.
    The score is per ``1 / motion_fps`` seconds whatever the clip's frame rate, so a frame stride does not
    change the bucket.
``cond_aug``
    **The standard deviation of the Gaussian noise added to the conditioning frame** (in [-1, 1] pixel units)
    before the autoencoder encodes it for the concat branch; the CLIP branch sees the clean frame. SVD samples
    with 0.02. The value passed in ``added_time_ids`` must be the one used for the noise, which
    :class:`SVDConditioner` guarantees.

Classifier-free guidance
------------------------

SVD's unconditional branch is a zero CLIP embedding and a zero concat latent; the micro-conditioning is kept
(:func:`unconditional` gives the zeros; a key it leaves out is shared by both halves in
``vdiff.diffusion.guidance.guided_call``). Training drops each condition per sample with its own probability,
to zeros: that is exactly ``vdiff.diffusion.guidance.drop_conditions(cond, cfg_drop_probs(image=p, concat=q))``
(per-key Bernoulli per sample, zeros where dropped; ``groups=[(CONTEXT_KEY, CONCAT_KEY)]`` drops both). It is
not re-implemented here and not called from here: ``vdiff.models`` and ``vdiff.diffusion`` are siblings in the
layer order (neither imports the other; docs/architecture.md), so the LightningModule that owns the training step
calls it.

Shapes use ``B`` clips, ``T`` frames, ``c`` latent channels, ``D`` embedding width.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

# The cond keys this module fills, declared with the UNet that reads them: CONTEXT_KEY (B, 1, D) CLIP image
# embedding tokens (cross-attention context), CONCAT_KEY (B, T, c, h, w) unscaled conditioning-frame latent repeated
# over T, ADDED_TIME_IDS_KEY (B, 3) raw fps_id, motion_bucket_id, cond_aug.
from vdiff.models.unet_svd import ADDED_TIME_IDS_KEY, CONCAT_KEY, CONTEXT_KEY

# SVD's sampling defaults (sgm scripts/sampling/simple_video_sample.py, diffusers pipeline)
SVD_FPS_ID = 6  # i.e. 7 frames per second
SVD_MOTION_BUCKET_ID = 127
SVD_COND_AUG = 0.02

# CLIP's image normalisation (OpenAI's statistics; open_clip and sgm use them for ViT-H/14 laion2b too)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Activation = Literal["gelu", "quick_gelu"]
ACTIVATIONS: tuple[str, ...] = ("gelu", "quick_gelu")


#################################################################################
#                          CLIP image embedder: config                          #
#################################################################################


@dataclass
class CLIPImageEmbedderConfig:
    """A CLIP image tower (pre-norm ViT, class-token pooling) and its projection; sizes in :data:`CLIP_IMAGE_CONFIGS`.

    The defaults are ``"vit-h-14"``: OpenCLIP ViT-H/14 (laion2b_s32b_b79k), the image encoder of SVD, timm's
    ``vit_huge_patch14_clip_224`` architecture (``tests/models/test_conditioners.py`` checks that).

    image_size, patch_size: input resolution (preprocessing resizes to it) and patch size.
    width, depth, num_heads, mlp_dim: transformer width, blocks, attention heads, MLP hidden width.
    embed_dim: output width of the projection (the UNet's cross-attention width, 1024 for SVD).
    act: MLP activation: ``"gelu"`` (exact erf GELU: open_clip's ViT-H-14, SVD's image encoder) or
        ``"quick_gelu"`` (``x * sigmoid(1.702 x)``: OpenAI's CLIP, transformers' ``CLIPVisionConfig`` default).
    norm_eps: LayerNorm epsilon.
    mean, std: per-channel image normalisation after mapping [-1, 1] to [0, 1].
    """

    image_size: int = 224
    patch_size: int = 14
    width: int = 1280
    depth: int = 32
    num_heads: int = 16
    mlp_dim: int = 5120
    embed_dim: int = 1024
    act: Activation = "gelu"
    norm_eps: float = 1e-5
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]
        for name in ("image_size", "patch_size", "width", "depth", "num_heads", "mlp_dim", "embed_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"CLIPImageEmbedderConfig.{name} must be a positive integer, got {value!r}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"CLIPImageEmbedderConfig.act must be one of {ACTIVATIONS}, got {self.act!r}")
        if self.width % self.num_heads:
            raise ValueError(
                f"CLIPImageEmbedderConfig: width {self.width} is not divisible by num_heads {self.num_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"CLIPImageEmbedderConfig: image_size {self.image_size} is not divisible by patch_size {self.patch_size}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(
                f"CLIPImageEmbedderConfig: mean/std need 3 channels and std > 0, got {self.mean}, {self.std}"
            )
        if not self.norm_eps > 0:
            raise ValueError(f"CLIPImageEmbedderConfig.norm_eps must be > 0, got {self.norm_eps!r}")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> CLIPImageEmbedderConfig:
        """The named size (a key of :data:`CLIP_IMAGE_CONFIGS`) with ``overrides`` applied to its fields."""
        if name not in CLIP_IMAGE_CONFIGS:
            raise ValueError(
                f"CLIPImageEmbedderConfig: unknown size {name!r}; choose from {sorted(CLIP_IMAGE_CONFIGS)}"
            )
        return CLIP_IMAGE_CONFIGS[name].replace(**overrides)

    def replace(self, **overrides: Any) -> CLIPImageEmbedderConfig:
        """A copy with ``overrides`` applied; an unknown field is an error naming it."""
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"CLIPImageEmbedderConfig: unknown field(s) {unknown}; fields are {sorted(fields)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CLIPImageEmbedderConfig:
        return cls().replace(**dict(data))

    @property
    def num_positions(self) -> int:
        """Tokens of the transformer: one per patch plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1


CLIP_IMAGE_CONFIGS: dict[str, CLIPImageEmbedderConfig] = {
    # OpenCLIP ViT-H/14 (SVD's image encoder): 632M parameters, 257 tokens of width 1280, projection to 1024.
    "vit-h-14": CLIPImageEmbedderConfig(),
    # Tests: transformers' CLIPVisionConfig defaults for activation and norm (quick_gelu, 1e-5), tiny sizes.
    "tiny": CLIPImageEmbedderConfig(
        image_size=32, patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64, embed_dim=24, act="quick_gelu"
    ),
}


#################################################################################
#                          CLIP image embedder: network                         #
#################################################################################


def _gaussian_kernel1d(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Normalised Gaussian of odd length ``size`` centred on its middle tap: ``(size,)``."""
    x = torch.arange(size, dtype=torch.float64) - size // 2
    kernel = torch.exp(-(x**2) / (2.0 * sigma**2))
    return (kernel / kernel.sum()).to(dtype=dtype, device=device)


def resize_antialiased(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize ``(N, C, H, W)`` -> ``(N, C, h, w)`` as SVD does before CLIP: Gaussian blur, then bicubic.

    This is ``kornia.geometry.resize(x, size, interpolation="bicubic", align_corners=True, antialias=True)``,
    which sgm's ``FrozenOpenCLIPImageEmbedder.preprocess`` calls (diffusers' SVD pipeline reimplements it as
    ``_resize_with_antialiasing``): per axis a Gaussian of ``sigma = max((in / out - 1) / 2, 0.001)`` over
    ``max(4 sigma, 3)`` taps rounded down to an integer and up to the next odd number, applied with reflect
    padding (width first, then height), then ``F.interpolate(mode="bicubic", align_corners=True)``. Not
    ``F.interpolate(antialias=True)``, which filters differently.
    """
    if images.ndim != 4:
        raise ValueError(f"resize_antialiased: images must be (N, C, H, W), got shape {tuple(images.shape)}")
    channels, (height, width) = images.shape[1], images.shape[-2:]
    out = images
    for axis, (length, target) in enumerate(((width, size[1]), (height, size[0]))):  # width first, as kornia
        sigma = max((length / target - 1.0) / 2.0, 0.001)
        taps = int(max(4.0 * sigma, 3.0)) | 1  # an even tap count grows by one
        kernel = _gaussian_kernel1d(taps, sigma, out.dtype, out.device)
        if axis == 0:  # along W
            out = F.pad(out, (taps // 2, taps // 2, 0, 0), mode="reflect")
            weight = kernel.view(1, 1, 1, taps).expand(channels, 1, 1, taps)
        else:  # along H
            out = F.pad(out, (0, 0, taps // 2, taps // 2), mode="reflect")
            weight = kernel.view(1, 1, taps, 1).expand(channels, 1, taps, 1)
        out = F.conv2d(out, weight, groups=channels)
    return F.interpolate(out, size=tuple(size), mode="bicubic", align_corners=True)


def clip_preprocess(
    frames: Tensor,
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> Tensor:
    """SVD's CLIP preprocessing: ``(N, 3, H, W)`` in [-1, 1] -> ``(N, 3, size, size)`` CLIP pixel values (float32).

    Resize to ``size x size`` (no crop: the aspect ratio is not kept, as in sgm and diffusers) with
    :func:`resize_antialiased` on the [-1, 1] values, map to [0, 1], then ``(x - mean) / std`` per channel.
    """
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"clip_preprocess: frames must be (N, 3, H, W) in [-1, 1], got shape {tuple(frames.shape)}")
    x = resize_antialiased(frames.float(), (size, size))  # (N, 3, size, size) in ~[-1, 1]
    x = (x + 1.0) / 2.0
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class CLIPImageEmbedder(nn.Module):
    """A CLIP image tower (timm ``VisionTransformer``) and its projection: frames -> ``(B, 1, embed_dim)`` tokens.

    ``visual`` is timm's pre-norm CLIP ViT (``vit_huge_patch14_clip_224`` for ``"vit-h-14"``): patch conv without
    bias, class token, learned positions, LayerNorm before the blocks (``pre_norm``; transformers' ``pre_layrnorm``,
    open_clip's ``ln_pre``), pre-LN blocks with the configured activation, a final LayerNorm, class-token pooling.
    ``proj`` is the bias-free projection (open_clip's ``visual.proj``, transformers' ``visual_projection``).
    Weights come from :mod:`vdiff.weights.clip`. Freezing is the caller's choice (SVD never trains it).
    """

    def __init__(self, config: CLIPImageEmbedderConfig | str = "vit-h-14") -> None:
        super().__init__()
        if isinstance(config, str):
            config = CLIPImageEmbedderConfig.from_name(config)
        self.config = config
        self.visual = VisionTransformer(
            img_size=config.image_size,
            patch_size=config.patch_size,
            in_chans=3,
            num_classes=0,  # no head: ``proj`` below is the projection
            global_pool="token",
            embed_dim=config.width,
            depth=config.depth,
            num_heads=config.num_heads,
            mlp_ratio=config.mlp_dim / config.width,
            qkv_bias=True,
            class_token=True,
            pre_norm=True,  # ln_pre (and no patch-conv bias)
            final_norm=True,  # ln_post, applied to every token before pooling the class token
            fc_norm=False,
            act_layer=nn.GELU if config.act == "gelu" else "quick_gelu",  # nn.GELU: as vit_huge_patch14_clip_224
            norm_layer=functools.partial(LayerNorm, eps=config.norm_eps),
        )
        if self.visual.blocks[0].mlp.fc1.out_features != config.mlp_dim:  # timm computes int(width * mlp_ratio)
            raise ValueError(f"CLIPImageEmbedderConfig: mlp_dim {config.mlp_dim} is not representable as a ratio")
        self.proj = nn.Linear(config.width, config.embed_dim, bias=False)

    def preprocess(self, frames: Tensor) -> Tensor:
        """``(N, 3, H, W)`` in [-1, 1] -> ``(N, 3, S, S)`` pixel values, ``S = config.image_size`` (see :func:`clip_preprocess`)."""
        c = self.config
        return clip_preprocess(frames, c.image_size, c.mean, c.std)

    def embed_pixels(self, pixels: Tensor) -> Tensor:
        """Preprocessed pixel values ``(N, 3, S, S)`` -> image embeddings ``(N, embed_dim)``."""
        pixels = pixels.to(self.proj.weight.dtype)
        pooled = self.visual(pixels)  # (N, width): final-norm class token
        return self.proj(pooled)  # (N, embed_dim)

    def forward(self, frames: Tensor) -> Tensor:
        """Conditioning frames ``(B, 3, H, W)`` in [-1, 1] -> one embedding token per clip ``(B, 1, embed_dim)``."""
        return self.embed_pixels(self.preprocess(frames)).unsqueeze(1)  # (B, 1, D)


#################################################################################
#                             Micro-conditioning                                #
#################################################################################


def _per_clip(value: Tensor | float, batch: int | None, name: str, device: torch.device | None = None) -> Tensor:
    """A scalar or ``(B,)`` value as a float32 ``(B,)`` tensor (``batch`` None: keep the given length)."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    if t.ndim == 0:
        if batch is None:
            raise ValueError(f"{name}: a scalar needs a batch size")
        return t.expand(batch).clone()
    if t.ndim != 1 or (batch is not None and t.shape[0] != batch):
        raise ValueError(
            f"{name}: expected a scalar or shape ({batch if batch is not None else 'B'},), got {tuple(t.shape)}"
        )
    return t


FPS_ID_OFFSET = 1.0  # fps_id = fps - 1: SVD's UNet was micro-conditioned on the frame rate minus one


def fps_id_from_fps(fps: Tensor | float, dtype: torch.dtype = torch.float32) -> Tensor:
    """SVD's ``fps_id`` of clips at ``fps`` frames per second: ``fps - 1``, ``dtype``, same shape (``(B,)`` or scalar)."""
    fps = torch.as_tensor(fps, dtype=dtype)
    if not bool(torch.all(torch.isfinite(fps) & (fps > 0))):
        raise ValueError(f"fps_id_from_fps: frame rates must be positive and finite, got {fps.tolist()}")
    return fps - FPS_ID_OFFSET


def fps_id_of(fps: float) -> float:
    """The ``fps_id`` of one frame rate as a Python float (:func:`fps_id_from_fps` in float64: ``fps - 1`` exactly)."""
    return float(fps_id_from_fps(fps, torch.float64))


def fps_of(fps_id: float) -> float:
    """The frame rate an ``fps_id`` stands for, ``fps_id + 1`` (SVD's scripts write a sample at this rate)."""
    return float(fps_id) + FPS_ID_OFFSET


def added_time_ids(
    fps_id: Tensor | float,
    motion_bucket_id: Tensor | float,
    cond_aug: Tensor | float,
    batch: int | None = None,
) -> Tensor:
    """The UNet's ``added_time_ids`` ``(B, 3)`` float32: columns ``fps_id``, ``motion_bucket_id``, ``cond_aug``.

    The order is SVD's (sgm's conditioner lists fps_id, motion_bucket_id, cond_aug after the image embedder;
    diffusers' ``_get_add_time_ids`` builds ``[fps, motion_bucket_id, noise_aug_strength]``). Each argument is a
    scalar or ``(B,)``; scalars are broadcast (give ``batch`` when all three are scalars).
    """
    if batch is None:
        sizes = {torch.as_tensor(v).shape[0] for v in (fps_id, motion_bucket_id, cond_aug) if torch.as_tensor(v).ndim}
        if len(sizes) > 1:
            raise ValueError(f"added_time_ids: batch sizes differ: {sorted(sizes)}")
        batch = sizes.pop() if sizes else None
    device = next((v.device for v in (fps_id, motion_bucket_id, cond_aug) if isinstance(v, Tensor)), None)
    columns = [
        _per_clip(v, batch, f"added_time_ids({name})", device)
        for name, v in (("fps_id", fps_id), ("motion_bucket_id", motion_bucket_id), ("cond_aug", cond_aug))
    ]
    return torch.stack(columns, dim=1)  # (B, 3)


NUM_MOTION_BUCKETS = 256  # SVD's motion_bucket_id range 0..255
# The keys vdiff's curation writes into a sample json's ``extra`` (vdiff/data/convert/folder.py, convert_input) and
# the defaults of its motion score (vdiff/data/convert/curation.py: DEFAULT_FLOW_FPS, DEFAULT_FLOW_SIZE). They are
# repeated, not imported: vdiff.models may not import vdiff.data. tests/models/test_conditioners.py checks them.
MOTION_SCORE_KEY, MOTION_FPS_KEY, MOTION_SIZE_KEY = "motion_score", "motion_fps", "motion_size"
FLOW_FPS, FLOW_SIZE = 2.0, 128


@dataclass(frozen=True)
class MotionBuckets:
    """A monotone map from vdiff's motion score (mean Farneback flow magnitude) to SVD's ``motion_bucket_id``.

    ``level(score)`` is piecewise linear through the knots ``(scores[i], levels[i])`` and constant beyond the
    end knots; the bucket is ``min(floor(num_buckets * level), num_buckets - 1)``. When the knots are a shard
    set's score quantiles at levels ``k / num_buckets`` (:func:`fit_motion_buckets`), bucket ``k`` holds exactly
    the clips between the ``k``-th and ``(k + 1)``-th quantile: every bucket is equally populated on that set.

    scores: knot scores, strictly increasing, in the units of ``flow_fps`` / ``flow_size`` (curation's
        ``motion_score``: pixels at a ``flow_size``-pixel shorter side per ``1 / flow_fps`` seconds).
    levels: knot levels in [0, 1], non-decreasing.
    num_buckets: 256 for SVD (ids 0..255).
    flow_fps, flow_size: the motion-score parameters the knots were measured with; :meth:`score_of` refuses a
        clip scored with others.
    source: how the map was made (free text, kept in the JSON).
    """

    scores: tuple[float, ...]
    levels: tuple[float, ...]
    num_buckets: int = NUM_MOTION_BUCKETS
    flow_fps: float = FLOW_FPS
    flow_size: int = FLOW_SIZE
    source: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "scores", tuple(float(s) for s in self.scores))
        object.__setattr__(self, "levels", tuple(float(v) for v in self.levels))
        s, v = self.scores, self.levels
        if len(s) < 2 or len(s) != len(v):
            raise ValueError(f"MotionBuckets: need >= 2 knots and as many levels as scores, got {len(s)} and {len(v)}")
        if not all(math.isfinite(x) for x in s + v):
            raise ValueError("MotionBuckets: knot scores and levels must be finite")
        if any(b <= a for a, b in zip(s, s[1:])):
            raise ValueError(f"MotionBuckets: knot scores must be strictly increasing, got {list(s)}")
        if any(b < a for a, b in zip(v, v[1:])) or v[0] < 0.0 or v[-1] > 1.0:
            raise ValueError(f"MotionBuckets: levels must be non-decreasing within [0, 1], got {list(v)}")
        if not isinstance(self.num_buckets, int) or self.num_buckets < 1:
            raise ValueError(f"MotionBuckets: num_buckets must be a positive integer, got {self.num_buckets!r}")

    def level(self, score: Tensor | float | Sequence[float]) -> Tensor:
        """The piecewise-linear map: scores (any shape) -> levels in [0, 1], float64, same shape."""
        x = torch.as_tensor(score, dtype=torch.float64)
        knots = torch.tensor(self.scores, dtype=torch.float64, device=x.device)
        levels = torch.tensor(self.levels, dtype=torch.float64, device=x.device)
        i = (torch.searchsorted(knots, x.contiguous(), right=True) - 1).clamp(0, len(knots) - 2)
        x0, x1, y0, y1 = knots[i], knots[i + 1], levels[i], levels[i + 1]
        t = ((x - x0) / (x1 - x0)).clamp(0.0, 1.0)  # clamping makes the map constant beyond the end knots
        return y0 + t * (y1 - y0)

    def __call__(self, score: Tensor | float | Sequence[float]) -> Tensor:
        """Motion scores (any shape, e.g. ``(B,)``) -> ``motion_bucket_id`` in ``0..num_buckets-1``, long, same shape."""
        x = torch.as_tensor(score, dtype=torch.float64)
        if not bool(torch.all(torch.isfinite(x))):
            raise ValueError(f"MotionBuckets: motion scores must be finite, got {x.tolist()}")
        return torch.floor(self.level(x) * self.num_buckets).clamp(0, self.num_buckets - 1).long()

    def score_of(self, extra: Mapping[str, Any]) -> float:
        """The motion score stored by vdiff's curation in a sample json's ``extra``, checked against these units."""
        if MOTION_SCORE_KEY not in extra or extra[MOTION_SCORE_KEY] is None:
            raise KeyError(
                f"sample json extra has no {MOTION_SCORE_KEY!r} (keys: {sorted(extra)}): curate the clips with "
                "`vdiff data shards` (motion score on) to derive motion_bucket_id, or give motion_bucket_id directly"
            )
        for key, ours in ((MOTION_FPS_KEY, self.flow_fps), (MOTION_SIZE_KEY, self.flow_size)):
            if key in extra and float(extra[key]) != float(ours):
                raise ValueError(
                    f"motion score measured with {key}={extra[key]!r} but these buckets were fitted on scores with "
                    f"{key}={ours!r}: refit the buckets on this data (fit_motion_buckets)"
                )
        return float(extra[MOTION_SCORE_KEY])


def fit_motion_buckets(
    scores: Tensor | Sequence[float],
    num_buckets: int = NUM_MOTION_BUCKETS,
    num_knots: int | None = None,
    flow_fps: float = FLOW_FPS,
    flow_size: int = FLOW_SIZE,
    source: str = "",
) -> MotionBuckets:
    """Fit :class:`MotionBuckets` to a shard set's motion scores so that its buckets are equally populated.

    The knots are the empirical quantiles (linear interpolation between order statistics, numpy's default) at
    levels ``linspace(0, 1, num_knots)``; ``num_knots`` defaults to ``num_buckets + 1``, which puts every bucket
    edge on a quantile. Equal quantiles (many clips with the same score, e.g. exactly static ones) merge into one
    knot at the mean of their levels (mid-rank), since equal scores must share a bucket: such a mass of clips fills
    one bucket and leaves the other buckets of its quantile range (nearly) empty; the rest stay equally populated.

    scores: ``(N,)`` motion scores (``extra["motion_score"]`` of every clip; see :meth:`MotionBuckets.score_of`).
    flow_fps, flow_size: the motion-score parameters they were measured with (curation's defaults: 2.0, 128).
    """
    x = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if x.numel() < 2 or not bool(torch.all(torch.isfinite(x))):
        raise ValueError(
            f"fit_motion_buckets: need at least 2 finite scores, got {x.numel()} (finite: {bool(torch.all(torch.isfinite(x)))})"
        )
    num_knots = num_buckets + 1 if num_knots is None else int(num_knots)
    if num_knots < 2:
        raise ValueError(f"fit_motion_buckets: num_knots must be >= 2, got {num_knots}")
    ordered = torch.sort(x).values
    levels = torch.linspace(0.0, 1.0, num_knots, dtype=torch.float64)
    position = levels * (ordered.numel() - 1)
    lo = position.floor().long().clamp(max=ordered.numel() - 1)
    hi = (lo + 1).clamp(max=ordered.numel() - 1)
    knots = ordered[lo] + (position - lo) * (ordered[hi] - ordered[lo])  # (K,)
    knots = torch.maximum(knots, torch.cummax(knots, 0).values)  # rounding can not make quantiles decrease
    unique, inverse, counts = torch.unique_consecutive(knots, return_inverse=True, return_counts=True)
    if unique.numel() < 2:
        raise ValueError(
            f"fit_motion_buckets: all {x.numel()} scores are equal ({unique[0].item()}); nothing to bucket"
        )
    merged = torch.zeros_like(unique).index_add_(0, inverse, levels) / counts
    return MotionBuckets(
        scores=tuple(unique.tolist()),
        levels=tuple(merged.tolist()),
        num_buckets=num_buckets,
        flow_fps=float(flow_fps),
        flow_size=int(flow_size),
        source=source or f"fit_motion_buckets: quantiles of {x.numel()} scores",
    )


# The default map, for data without fitted buckets. It is not fitted to data: Stability never published SVD's
# bucketing, and no public driving clips could be scored here. It is log-uniform in the score between two
# physical anchors of curation's unit (pixels at a 128-pixel shorter side per half second): 0.25 px (sub-pixel
# jitter: a static shot) -> bucket 0 and 64 px (half the frame in half a second: extreme motion) -> bucket 255,
# one knot per octave (linear in between), so every doubling of the motion adds 32 buckets and 4 px/0.5 s, the
# geometric middle, lands on 128, next to SVD's default 127. As a check, vdiff's synthetic driving clips (128 px,
# 10 fps, 24 frames, seeds 0-47) score 0.05-7.4 (median 3.7 -> bucket 123; the car stopped: 0.08-0.13 -> 0).
# Fit your own with fit_motion_buckets.
DEFAULT_MOTION_BUCKETS = MotionBuckets(
    scores=tuple(0.25 * 2.0**k for k in range(9)),
    levels=tuple(k / 8 for k in range(9)),
    source="default: log-uniform, 0.25 px -> 0, 64 px -> 255 (one knot per octave), not fitted to data",
)


#################################################################################
#                          Concat branch, CFG, conditioner                      #
#################################################################################


class Posterior(Protocol):
    def mode(self) -> Tensor: ...


class Encoder(Protocol):
    """What the concat branch needs of an autoencoder: ``encode((B, T, 3, H, W) in [-1, 1]) -> posterior``."""

    def encode(self, video: Tensor) -> Posterior: ...


def concat_condition(
    autoencoder: Encoder,
    frame: Tensor,
    cond_aug: Tensor | float,
    num_frames: int,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """SVD's concat branch: ``encode(frame + cond_aug * noise).mode()``, UNSCALED, repeated over ``num_frames``.

    frame: ``(B, 3, H, W)`` in [-1, 1]; cond_aug: scalar or ``(B,)`` noise std; noise: ``(B, 3, H, W)`` (default
    ``N(0, 1)`` drawn with ``generator``). The latent is the posterior mode, not a sample, and is NOT multiplied by
    the autoencoder's scale factor (as sgm's ``VideoPredictionEmbedderWithEncoder`` with ``scale_factor=1`` and
    diffusers' ``_encode_vae_image``). Gradients flow if the caller allows them; wrap in ``torch.no_grad()`` for a
    frozen autoencoder. Returns ``(B, num_frames, c, h, w)``.
    """
    if frame.ndim != 4:
        raise ValueError(f"concat_condition: frame must be (B, 3, H, W), got shape {tuple(frame.shape)}")
    batch = frame.shape[0]
    if noise is None:
        noise = torch.randn(frame.shape, generator=generator, device=frame.device, dtype=frame.dtype)
    elif noise.shape != frame.shape:
        raise ValueError(f"concat_condition: noise shape {tuple(noise.shape)} != frame shape {tuple(frame.shape)}")
    sigma = _per_clip(cond_aug, batch, "concat_condition(cond_aug)", frame.device).to(frame.dtype)
    noisy = frame + sigma.view(batch, 1, 1, 1) * noise  # (B, 3, H, W)
    latent = autoencoder.encode(noisy.unsqueeze(1)).mode()  # (B, 1, c, h, w), unscaled
    if latent.ndim != 5 or latent.shape[1] != 1:
        raise ValueError(f"concat_condition: the autoencoder encoded one frame to shape {tuple(latent.shape)}")
    return latent.repeat(1, num_frames, 1, 1, 1)  # (B, T, c, h, w)


def cfg_drop_probs(image: float, concat: float) -> dict[str, float]:
    """Per-condition CFG dropout probabilities for ``vdiff.diffusion.guidance.drop_conditions`` (the
    micro-conditioning is never dropped)."""
    return {CONTEXT_KEY: float(image), CONCAT_KEY: float(concat)}


def unconditional(cond: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """SVD's unconditional branch for CFG: zeros of ``context`` and ``concat`` (those present); other keys
    (``added_time_ids``) are left out, so ``guided_call`` shares them between both halves."""
    return {key: torch.zeros_like(value) for key, value in cond.items() if key in (CONTEXT_KEY, CONCAT_KEY)}


class SVDConditioner(nn.Module):
    """The three SVD conditions of a clip from its conditioning frame (the module docstring's table).

    Holds the CLIP image embedder (or None when every batch brings a precomputed ``image_embed``); the
    autoencoder is passed to :meth:`forward`, as the LightningModule owns it (frozen).
    """

    def __init__(self, image_embedder: CLIPImageEmbedder | CLIPImageEmbedderConfig | str | None = "vit-h-14") -> None:
        super().__init__()
        if isinstance(image_embedder, (str, CLIPImageEmbedderConfig)):
            image_embedder = CLIPImageEmbedder(image_embedder)
        self.image_embedder = image_embedder

    def forward(
        self,
        frame: Tensor,
        autoencoder: Encoder,
        num_frames: int,
        fps_id: Tensor | float = SVD_FPS_ID,
        motion_bucket_id: Tensor | float = SVD_MOTION_BUCKET_ID,
        cond_aug: Tensor | float = SVD_COND_AUG,
        image_embed: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """frame ``(B, 3, H, W)`` in [-1, 1] -> ``{context (B, 1, D), concat (B, T, c, h, w), added_time_ids (B, 3)}``.

        fps_id, motion_bucket_id, cond_aug: scalars or ``(B,)`` (see :func:`fps_id_from_fps`, :class:`MotionBuckets`).
        image_embed: a precomputed ``(B, D)`` or ``(B, 1, D)`` embedding of the clean ``frame`` (the latent shards'
        optional ``image_embed``) instead of running the image embedder. noise, generator: for the concat branch.
        """
        batch = frame.shape[0]
        if image_embed is None:
            if self.image_embedder is None:
                raise ValueError("SVDConditioner: no image embedder and no precomputed image_embed")
            tokens = self.image_embedder(frame)  # (B, 1, D), from the clean frame
        else:
            tokens = image_embed.unsqueeze(1) if image_embed.ndim == 2 else image_embed
            if tokens.ndim != 3 or tokens.shape[:2] != (batch, 1):
                raise ValueError(
                    f"SVDConditioner: image_embed must be (B, D) or (B, 1, D), got {tuple(image_embed.shape)}"
                )
        sigma = _per_clip(cond_aug, batch, "SVDConditioner(cond_aug)", frame.device)
        return {
            CONTEXT_KEY: tokens,
            CONCAT_KEY: concat_condition(autoencoder, frame, sigma, num_frames, noise=noise, generator=generator),
            ADDED_TIME_IDS_KEY: added_time_ids(fps_id, motion_bucket_id, sigma, batch=batch).to(frame.device),
        }


__all__ = [
    "CLIP_IMAGE_CONFIGS",
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_MOTION_BUCKETS",
    "CLIPImageEmbedder",
    "CLIPImageEmbedderConfig",
    "MotionBuckets",
    "SVDConditioner",
    "added_time_ids",
    "cfg_drop_probs",
    "clip_preprocess",
    "concat_condition",
    "fit_motion_buckets",
    "fps_id_from_fps",
    "fps_id_of",
    "fps_of",
    "resize_antialiased",
    "unconditional",
]
