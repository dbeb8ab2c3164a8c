"""KL video autoencoder: the SD-layout image VAE with a frame-wise or SVD's temporal decoder.

The autoencoder contract (docs/architecture.md, "Contracts")::

    posterior = ae.encode(video)        # video (B, T, 3, H, W) in [-1, 1] -> DiagonalGaussian over (B, T, c, h, w)
    video = ae.decode(latents)          # latents (B, T, c, h, w), UNSCALED -> (B, T, 3, H, W)
    z_model = ae.scale_latents(z)       # (z - shift_factor) * scale_factor, what diffusion models see

Latents are unscaled everywhere at this interface; ``scale_factor`` / ``shift_factor`` say how to map them
to the unit-variance space diffusion models train in. ``IdentityAutoencoder`` lets pixel-space models
take the same path.

Architecture (SD 2.1 VAE; SVD's VAE is the same encoder with ``TemporalDecoder``):

    Encoder:  conv_in -> [ResBlock x num_res_blocks, Downsample] per level (no downsample at the last)
              -> mid (ResBlock, single-head spatial attention, ResBlock) -> norm, SiLU, conv_out (2z)
    Decoder:  conv_in -> mid -> [ResBlock x (num_res_blocks + 1), Upsample] per level, lowest resolution
              first -> norm, SiLU, conv_out (3)
    TemporalDecoder: every ResBlock becomes a VideoResBlock (spatial ResBlock per frame, then a (3,1,1)
              temporal ResBlock, blended alpha*spatial + (1-alpha)*temporal, alpha = 1 - sigmoid(mix_factor))
              and conv_out is followed by a (3,1,1) Conv3d over time.

Named sizes are data: ``AUTOENCODER_CONFIGS`` (``"sd"``, ``"svd"``, ``"tiny"``, ``"tiny-svd"``) and
``AutoencoderConfig.from_name("svd", z_channels=8)``. Weight files (reading, writing, the diffusers and sgm
layouts) live one layer up, in :mod:`vdiff.weights.autoencoder`; this module knows no file format.

Decoding can run in overlapping frame chunks and overlapping spatial tiles; outputs are stitched with a
linear cross-fade (``torch.lerp``), so where two windows agree the stitched value is bit-identical.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vdiff.nn.blend import blend
from vdiff.nn.norms import NORM_KINDS, NormKind, NormSpec, make_norm
from vdiff.nn.resnet import Downsample, ResBlock, TemporalConv, Upsample

DecoderKind = Literal["2d", "temporal"]
Norm = NormKind | NormSpec  # what the blocks take: a kind, or a kind with its GroupNorm group count


#################################################################################
#                                  Configuration                                #
#################################################################################


@dataclass
class AutoencoderConfig:
    """Sizes and options of a KL video autoencoder (defaults: the SD 2.1 VAE, ``AUTOENCODER_CONFIGS["sd"]``).

    ``norm_num_groups`` is the group count of every GroupNorm (``norm="group"``); ``ch`` and every
    ``ch * m`` (``m`` in ``ch_mult``) must be divisible by it. It cannot be read from a weights file
    (GroupNorm's parameters do not depend on it), so a file made with another count needs its config: a
    diffusers folder's ``config.json`` carries it.
    """

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    double_z: bool = True  # encoder predicts mean and log-variance; False = deterministic (mean only)
    mid_attention: bool = True
    norm: NormKind = "group"
    norm_num_groups: int = 32
    decoder: DecoderKind = "2d"
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scale_factor: float = 0.18215
    shift_factor: float = 0.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        if not self.ch_mult:
            raise ValueError("AutoencoderConfig.ch_mult must name at least one level")
        if self.norm not in NORM_KINDS:
            raise ValueError(f"AutoencoderConfig.norm={self.norm!r}; choose one of {NORM_KINDS}")
        if self.decoder not in ("2d", "temporal"):
            raise ValueError(f"AutoencoderConfig.decoder={self.decoder!r}; choose '2d' or 'temporal'")
        if self.num_res_blocks < 1:
            raise ValueError(f"AutoencoderConfig.num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if self.norm_num_groups < 1:
            raise ValueError(f"AutoencoderConfig.norm_num_groups must be >= 1, got {self.norm_num_groups}")
        if self.norm == "group":
            widths = sorted({self.ch, *(self.ch * m for m in self.ch_mult)})
            bad = [w for w in widths if w % self.norm_num_groups]
            if bad:
                raise ValueError(
                    f"AutoencoderConfig.norm_num_groups={self.norm_num_groups} does not divide the channel "
                    f"counts {bad} (ch={self.ch}, ch_mult={list(self.ch_mult)})"
                )

    @property
    def norm_spec(self) -> NormSpec:
        """The norm kind with its group count, as the blocks take it."""
        return NormSpec(self.norm, self.norm_num_groups)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AutoencoderConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"AutoencoderConfig: unknown fields {unknown}")
        return cls(**d)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> AutoencoderConfig:
        """A copy of the named size ``AUTOENCODER_CONFIGS[name]`` with ``overrides`` replacing fields.

        Raises:
            ValueError: ``name`` is not in ``AUTOENCODER_CONFIGS`` (the message lists the names), or an
                override is not a field of :class:`AutoencoderConfig` (the message names it).
        """
        if name not in AUTOENCODER_CONFIGS:
            raise ValueError(
                f"AutoencoderConfig.from_name: unknown name {name!r}; choose one of {sorted(AUTOENCODER_CONFIGS)}"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(
                f"AutoencoderConfig.from_name({name!r}): unknown field(s) {unknown}; the fields are {sorted(fields)}"
            )
        return dataclasses.replace(AUTOENCODER_CONFIGS[name], **overrides)


_TINY: dict[str, Any] = {"ch": 32, "ch_mult": (1, 2), "num_res_blocks": 1}

#: Named sizes (use ``AutoencoderConfig.from_name``, which copies; do not mutate these).
#: ``sd``: SD 2.1's VAE (the architecture of ``stabilityai/sd-vae-ft-mse``): ch 128, mult 1,2,4,4, 2 res
#: blocks, z 4, 8x downsampling, 32 groups, scale 0.18215, 2D decoder. ``svd``: Stable Video Diffusion's VAE,
#: the SD encoder with SVD's temporal decoder and no post_quant_conv (diffusers' ``AutoencoderKLTemporalDecoder``).
#: ``tiny`` / ``tiny-svd``: test sizes (ch 32, mult 1,2: 2x downsampling, 1 res block), 2D / temporal decoder.
AUTOENCODER_CONFIGS: dict[str, AutoencoderConfig] = {
    "sd": AutoencoderConfig(),
    "svd": AutoencoderConfig(decoder="temporal", use_post_quant_conv=False),
    "tiny": AutoencoderConfig(**_TINY),
    "tiny-svd": AutoencoderConfig(**_TINY, decoder="temporal", use_post_quant_conv=False),
}


#################################################################################
#                               Posterior                                       #
#################################################################################


class DiagonalGaussian:
    """Diagonal Gaussian posterior q(z|x) over latents ``(B, T, c, h, w)``; ``deterministic`` means std = 0."""

    def __init__(self, mean: Tensor, logvar: Tensor, deterministic: bool = False) -> None:
        self.mean = mean
        self.deterministic = deterministic
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        if deterministic:
            self.std = torch.zeros_like(mean)
            self.var = torch.zeros_like(mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    @classmethod
    def from_moments(cls, moments: Tensor, dim: int = 2) -> DiagonalGaussian:
        """Split ``moments`` (mean and log-variance concatenated along ``dim``) into a posterior."""
        mean, logvar = torch.chunk(moments, 2, dim=dim)
        return cls(mean, logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, summed over every non-batch dimension: ``(B,)``."""
        if self.deterministic:
            return self.mean.new_zeros(self.mean.shape[0])
        dims = tuple(range(1, self.mean.ndim))
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)


#################################################################################
#                               Core Blocks                                     #
#################################################################################


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions of each frame, with a residual (SD VAE mid block)."""

    def __init__(self, channels: int, norm: Norm = "group") -> None:
        super().__init__()
        self.norm = make_norm(norm, channels, eps=1e-6)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        tokens = self.norm(x.flatten(2)).transpose(1, 2)  # (N, HW, C)
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.q, self.k, self.v))  # (N, 1, HW, C) each
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (N, HW, C)
        out = self.proj_out(out).transpose(1, 2).reshape(n, c, h, w)  # (N, C, H, W), channels-last strides
        # `out + x` (not `x + out`) keeps the channels-last strides for the layers that follow, as diffusers
        # does; oneDNN then picks the same conv kernels and the parity tests match bit for bit.
        return out + x


class VideoResBlock(nn.Module):
    """Spatial ResBlock per frame, then a (3,1,1) temporal ResBlock; output :func:`~vdiff.nn.blend.blend`'s
    ``alpha*spatial + (1-alpha)*temporal`` with ``alpha = 1 - sigmoid(mix_factor)`` (``mix_factor`` weights the
    temporal path, as in SVD's VAE)."""

    def __init__(self, in_channels: int, out_channels: int, norm: Norm = "group", dropout: float = 0.0) -> None:
        super().__init__()
        self.spatial = ResBlock(in_channels, out_channels, norm=norm, eps=1e-6, dropout=dropout)
        # eps 1e-5 as SVD's time_stack (openaimodel GroupNorm default), not the spatial 1e-6.
        self.temporal = ResBlock(
            out_channels, out_channels, norm=norm, eps=1e-5, dropout=dropout, dims=3, kernel_size=(3, 1, 1)
        )
        self.mix_factor = nn.Parameter(torch.zeros(1))  # sigmoid(mix_factor) weights the temporal path

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        x = self.spatial(x)  # (B*T, C, H, W)
        bt, c, h, w = x.shape
        spatial = x.view(bt // num_frames, num_frames, c, h, w).transpose(1, 2)  # (B, C, T, H, W)
        temporal = self.temporal(spatial)  # (B, C, T, H, W)
        alpha = 1.0 - torch.sigmoid(self.mix_factor).to(x.dtype)  # the spatial weight, as diffusers computes it
        x = blend(spatial, temporal, alpha, "weighted_sum")  # (B, C, T, H, W), diffusers' values bit for bit
        return x.transpose(1, 2).reshape(bt, c, h, w)  # (B*T, C, H, W)


class MidBlock(nn.Module):
    """ResBlock -> single-head spatial attention -> ResBlock at the lowest resolution."""

    def __init__(self, channels: int, norm: Norm, dropout: float, attention: bool, video: bool) -> None:
        super().__init__()
        self.video = video
        block = VideoResBlock if video else ResBlock
        self.block1 = block(channels, channels, norm=norm, dropout=dropout)
        self.attn = SpatialSelfAttention(channels, norm) if attention else nn.Identity()
        self.block2 = block(channels, channels, norm=norm, dropout=dropout)

    def forward(self, x: Tensor, num_frames: int = 1) -> Tensor:
        if self.video:
            return self.block2(self.attn(self.block1(x, num_frames)), num_frames)  # (N, C, h, w)
        return self.block2(self.attn(self.block1(x)))  # (N, C, h, w)


class DownLevel(nn.Module):
    """One encoder resolution: ResBlocks, then an optional stride-2 Downsample."""

    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, norm: Norm, dropout: float, downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            ResBlock(in_ch if i == 0 else out_ch, out_ch, norm=norm, dropout=dropout) for i in range(num_blocks)
        )
        self.downsample = Downsample(out_ch, "right_bottom") if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)  # (N, C_out, H, W)
        return x if self.downsample is None else self.downsample(x)  # (N, C_out, H/2, W/2)


class UpLevel(nn.Module):
    """One decoder resolution: (Video)ResBlocks, then an optional nearest x2 Upsample."""

    def __init__(
        self, in_ch: int, out_ch: int, num_blocks: int, norm: Norm, dropout: float, upsample: bool, video: bool
    ):
        super().__init__()
        self.video = video
        block = VideoResBlock if video else ResBlock
        self.blocks = nn.ModuleList(
            block(in_ch if i == 0 else out_ch, out_ch, norm=norm, dropout=dropout) for i in range(num_blocks)
        )
        self.upsample = Upsample(out_ch) if upsample else None

    def forward(self, x: Tensor, num_frames: int = 1) -> Tensor:
        for block in self.blocks:
            x = block(x, num_frames) if self.video else block(x)  # (N, C_out, h, w)
        return x if self.upsample is None else self.upsample(x)  # (N, C_out, 2h, 2w)


#################################################################################
#                            Encoder and Decoders                               #
#################################################################################


class Encoder(nn.Module):
    """Frame-wise SD-layout encoder: (N, 3, H, W) -> (N, 2z or z, H/f, W/f) with f = 2**(levels-1)."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList(
            DownLevel(
                cfg.ch if i == 0 else chans[i - 1], chans[i], cfg.num_res_blocks, cfg.norm_spec, cfg.dropout,
                downsample=i < len(chans) - 1,
            )
            for i in range(len(chans))
        )
        self.mid = MidBlock(chans[-1], cfg.norm_spec, cfg.dropout, attention=cfg.mid_attention, video=False)
        self.norm_out = make_norm(cfg.norm_spec, chans[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chans[-1], 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (N, ch, H, W)
        for level in self.down:
            h = level(h)  # (N, ch*mult, H/2^i, W/2^i)
        h = self.mid(h)  # (N, C_top, h, w)
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, 2z, h, w)


class Decoder(nn.Module):
    """Frame-wise SD-layout decoder: (N, z, h, w) -> (N, 3, h*f, w*f); frames never see each other."""

    temporal = False

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        chans = [cfg.ch * m for m in reversed(cfg.ch_mult)]  # lowest resolution first
        video = self.temporal
        self.conv_in = nn.Conv2d(cfg.z_channels, chans[0], 3, padding=1)
        self.mid = MidBlock(chans[0], cfg.norm_spec, cfg.dropout, attention=cfg.mid_attention, video=video)
        self.up = nn.ModuleList(
            UpLevel(
                chans[0] if i == 0 else chans[i - 1], chans[i], cfg.num_res_blocks + 1, cfg.norm_spec, cfg.dropout,
                upsample=i < len(chans) - 1, video=video,
            )
            for i in range(len(chans))
        )
        self.norm_out = make_norm(cfg.norm_spec, chans[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chans[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))  # (N, C_top, h, w)
        for level in self.up:
            h = level(h)  # (N, C_i, h*2^i, w*2^i)
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, 3, H, W)


class TemporalDecoder(Decoder):
    """SVD's decoder: (B*T, z, h, w) -> (B*T, 3, H, W) with VideoResBlocks and a (3,1,1) Conv3d after conv_out."""

    temporal = True

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__(cfg)
        self.time_conv_out = TemporalConv(cfg.out_channels, cfg.out_channels, 3)

    def forward(self, z: Tensor, num_frames: int) -> Tensor:
        h = self.mid(self.conv_in(z), num_frames)  # (B*T, C_top, h, w)
        for level in self.up:
            h = level(h, num_frames)  # (B*T, C_i, h*2^i, w*2^i)
        x = self.conv_out(F.silu(self.norm_out(h)))  # (B*T, 3, H, W)
        bt, c, hh, ww = x.shape
        x = x.view(bt // num_frames, num_frames, c, hh, ww).transpose(1, 2)  # (B, 3, T, H, W)
        x = self.time_conv_out(x)  # (B, 3, T, H, W)
        return x.transpose(1, 2).reshape(bt, c, hh, ww)  # (B*T, 3, H, W)


#################################################################################
#                          Overlapped window stitching                          #
#################################################################################


def window_starts(length: int, window: int, overlap: int) -> list[int]:
    """Start indices of the fewest full-size windows covering ``[0, length)`` with >= ``overlap`` shared.

    The windows are spread evenly, so the actual overlaps can exceed ``overlap`` by up to one step.
    """
    if window >= length:
        return [0]
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must be in [0, window={window}), got {overlap}")
    gaps = -(-(length - window) // (window - overlap))  # ceil: number of steps between first and last window
    return [i * (length - window) // gaps for i in range(gaps + 1)]


def decode_in_windows(fn: Callable[[Tensor], Tensor], x: Tensor, dim: int, window: int, overlap: int, scale: int) -> Tensor:
    """Apply ``fn`` to overlapping windows of ``x`` along ``dim`` and stitch the outputs with a linear cross-fade.

    ``fn`` maps a window of size ``n`` along ``dim`` to an output of size ``n * scale`` along the same dim.
    In each overlap the weight of the newer window rises linearly from 0 to 1 (exclusive); the blend uses
    ``torch.lerp``, so it reproduces the value exactly wherever both windows agree.
    """
    length = x.shape[dim]
    starts = window_starts(length, window, overlap)
    if len(starts) == 1:
        return fn(x)
    out: Tensor | None = None
    covered = 0  # output positions [0, covered) already written
    for start in starts:
        y = fn(x.narrow(dim, start, window))
        if out is None:
            shape = list(y.shape)
            shape[dim] = length * scale
            out = y.new_empty(shape)
        begin, size = start * scale, y.shape[dim]
        shared = covered - begin  # >= 0: consecutive windows overlap or abut
        if shared > 0:
            view = [1] * y.ndim
            view[dim] = shared
            ramp = torch.arange(1, shared + 1, device=y.device, dtype=y.dtype).div_(shared + 1).view(view)
            region = out.narrow(dim, begin, shared)
            region.copy_(torch.lerp(region, y.narrow(dim, 0, shared), ramp))
        out.narrow(dim, covered, size - shared).copy_(y.narrow(dim, shared, size - shared))
        covered = begin + size
    assert out is not None and covered == length * scale
    return out


#################################################################################
#                              Autoencoders                                     #
#################################################################################


class VideoAutoencoder(nn.Module):
    """KL autoencoder for video ``(B, T, 3, H, W)`` in [-1, 1] <-> unscaled latents ``(B, T, c, h, w)``."""

    def __init__(self, config: AutoencoderConfig | None = None) -> None:
        super().__init__()
        cfg = config or AutoencoderConfig()
        self.config = cfg
        moments = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(moments, moments, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1) if cfg.use_post_quant_conv else None
        self.decoder = TemporalDecoder(cfg) if cfg.decoder == "temporal" else Decoder(cfg)
        self.scale_factor = cfg.scale_factor
        self.shift_factor = cfg.shift_factor
        self.latent_channels = cfg.z_channels
        self.spatial_downsample = 2 ** (len(cfg.ch_mult) - 1)
        self.temporal_downsample = 1
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """PyTorch defaults, except: temporal ResBlocks start as the identity (zero last conv, as SVD's
        time_stack) and ``time_conv_out`` starts as the identity over time, so a fresh temporal decoder
        decodes exactly like the 2D decoder with the same spatial weights."""
        for module in self.decoder.modules():
            if isinstance(module, VideoResBlock):
                nn.init.zeros_(module.temporal.conv2.weight)
                nn.init.zeros_(module.temporal.conv2.bias)
        if isinstance(self.decoder, TemporalDecoder):
            conv = self.decoder.time_conv_out
            with torch.no_grad():
                conv.weight.zero_()
                conv.weight[:, :, 1, 0, 0] = torch.eye(conv.out_channels)
                conv.bias.zero_()

    # ---------------------------------------------------------------- latent scaling
    def scale_latents(self, z: Tensor) -> Tensor:
        """Unscaled latents -> the unit-variance space diffusion models use: ``(z - shift) * scale``."""
        return (z - self.shift_factor) * self.scale_factor

    def unscale_latents(self, z: Tensor) -> Tensor:
        """Inverse of :meth:`scale_latents`."""
        return z / self.scale_factor + self.shift_factor

    # ---------------------------------------------------------------- encode
    def _check_video(self, video: Tensor) -> None:
        if video.ndim != 5 or video.shape[2] != self.config.in_channels:
            raise ValueError(
                f"encode: expected video (B, T, {self.config.in_channels}, H, W), got {tuple(video.shape)}"
            )
        f = self.spatial_downsample
        if video.shape[3] % f or video.shape[4] % f:
            raise ValueError(f"encode: H and W must be multiples of {f}, got {tuple(video.shape[3:])}")

    def encode(self, video: Tensor, chunk_size: int | None = None) -> DiagonalGaussian:
        """``video (B, T, 3, H, W)`` in [-1, 1] -> posterior over unscaled latents ``(B, T, c, H/f, W/f)``.

        ``chunk_size`` encodes that many frames at a time (the encoder is frame-wise, so the result is the same).
        """
        self._check_video(video)
        b, t = video.shape[:2]
        frames = video.flatten(0, 1)  # (B*T, 3, H, W)
        step = chunk_size or frames.shape[0]
        moments = torch.cat([self._encode_frames(chunk) for chunk in frames.split(step)])  # (B*T, 2c, h, w)
        moments = moments.unflatten(0, (b, t))  # (B, T, 2c, h, w)
        if self.config.double_z:
            return DiagonalGaussian.from_moments(moments, dim=2)
        return DiagonalGaussian(moments, torch.zeros_like(moments), deterministic=True)

    def _encode_frames(self, frames: Tensor) -> Tensor:
        h = self.encoder(frames)  # (N, 2c, h, w)
        return h if self.quant_conv is None else self.quant_conv(h)

    # ---------------------------------------------------------------- decode
    def decode(
        self,
        latents: Tensor,
        chunk_size: int | None = None,
        overlap: int = 0,
        tile: int | None = None,
        tile_overlap: int | None = None,
    ) -> Tensor:
        """Unscaled ``latents (B, T, c, h, w)`` -> ``video (B, T, 3, h*f, w*f)``.

        chunk_size:   decode this many frames at a time (peak memory grows with it); ``None`` = all frames.
        overlap:      frames shared by consecutive chunks, cross-faded linearly. The 2D decoder is frame-wise,
                      so chunking is exact; the temporal decoder sees only its chunk (its GroupNorm statistics
                      and temporal convs span time), and overlap hides the seams this leaves.
        tile:         latent tile side for spatial tiling (``None`` = whole frames); tiles overlap by
                      ``tile_overlap`` latent pixels (default ``tile // 4``) and are cross-faded linearly.
        """
        if latents.ndim != 5 or latents.shape[2] != self.latent_channels:
            raise ValueError(f"decode: expected latents (B, T, {self.latent_channels}, h, w), got {tuple(latents.shape)}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"decode: chunk_size must be >= 1, got {chunk_size}")
        if tile is not None:
            tile_overlap = tile // 4 if tile_overlap is None else tile_overlap
            if tile < 1 or not 0 <= tile_overlap < tile:
                raise ValueError(f"decode: need tile >= 1 and 0 <= tile_overlap < tile, got {tile}, {tile_overlap}")

        f = self.spatial_downsample

        def decode_row(z: Tensor) -> Tensor:  # (B, T', c, tile, w) -> (B, T', 3, tile*f, w*f), tiles along W
            return decode_in_windows(self._decode_clip, z, 4, tile, tile_overlap, f)

        def decode_tiles(z: Tensor) -> Tensor:  # (B, T', c, h, w) -> (B, T', 3, h*f, w*f), rows along H
            if tile is None:
                return self._decode_clip(z)
            return decode_in_windows(decode_row, z, 3, tile, tile_overlap, f)

        if chunk_size is None:
            return decode_tiles(latents)
        return decode_in_windows(decode_tiles, latents, 1, chunk_size, overlap, 1)

    def _decode_clip(self, z: Tensor) -> Tensor:
        b, t = z.shape[:2]
        z = z.flatten(0, 1)  # (B*T, c, h, w)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        if isinstance(self.decoder, TemporalDecoder):
            x = self.decoder(z, num_frames=t)  # (B*T, 3, H, W)
        else:
            x = self.decoder(z)  # (B*T, 3, H, W)
        return x.unflatten(0, (b, t))  # (B, T, 3, H, W)

    def forward(
        self, video: Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruct ``video (B, T, 3, H, W)``; returns ``(reconstruction, posterior)``."""
        posterior = self.encode(video)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()  # (B, T, c, h, w)
        return self.decode(z), posterior


class IdentityAutoencoder(nn.Module):
    """Pixel space through the autoencoder interface: latents = video, scale 1, no downsampling."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.scale_factor = 1.0
        self.shift_factor = 0.0
        self.latent_channels = channels
        self.spatial_downsample = 1
        self.temporal_downsample = 1

    def scale_latents(self, z: Tensor) -> Tensor:
        return z

    def unscale_latents(self, z: Tensor) -> Tensor:
        return z

    def encode(self, video: Tensor, chunk_size: int | None = None) -> DiagonalGaussian:
        """``video (B, T, C, H, W)`` -> a deterministic posterior whose mean is the video (chunking is moot)."""
        if video.ndim != 5 or video.shape[2] != self.latent_channels:
            raise ValueError(f"encode: expected video (B, T, {self.latent_channels}, H, W), got {tuple(video.shape)}")
        return DiagonalGaussian(video, torch.zeros_like(video), deterministic=True)

    def decode(self, latents: Tensor, chunk_size: int | None = None, overlap: int = 0,
               tile: int | None = None, tile_overlap: int | None = None) -> Tensor:
        """Latents are the video; chunking and tiling are exact no-ops here."""
        if latents.ndim != 5 or latents.shape[2] != self.latent_channels:
            raise ValueError(f"decode: expected (B, T, {self.latent_channels}, H, W), got {tuple(latents.shape)}")
        return latents
