"""Read OpenDriveLab/Vista checkpoints (Gao et al., 2024) into UNet-SVD names, and Vista's hand-made LoRA into
peft LoRA adapters.

Vista (https://github.com/OpenDriveLab/Vista, read at commit :data:`VISTA_COMMIT`) is a fork of sgm. Its UNet is
sgm's ``VideoUNet`` (``vwm/modules/diffusionmodules/video_model.py``) with three additions, each read here into
the layer vdiff has for it (:mod:`vdiff.models.unet_svd`):

=============================================================  ==============================================
Vista, under ``model.diffusion_model.``                         vdiff :class:`~vdiff.models.unet_svd.UNetSVD`
=============================================================  ==============================================
every sgm ``VideoUNet`` key (SVD-XT's)                          :func:`vdiff.weights.unet_svd.peer_names` (sgm)
``cond_time_stack_embed.{0,2}.{weight,bias}``                   ``cond_time_embed.mlp.{0,2}.{weight,bias}``
``<cross>.k_adapter_action_control.weight`` ``(D, 2432)``       ``<cross>.action_kv.weight`` rows ``[:D]``
``<cross>.v_adapter_action_control.weight`` ``(D, 2432)``       ``<cross>.action_kv.weight`` rows ``[D:]``
``<attn>.{q,k,v,out}_adapter_down.weight`` ``(r, in)``           a peft LoRA adapter's ``lora_A`` (below), or merged
``<attn>.{q,k,v,out}_adapter_up.weight`` ``(out, r)``            its ``lora_B``
=============================================================  ==============================================

``<cross>`` is every cross-attention: ``transformer_blocks.0.attn2`` (spatial) and ``time_stack.0.attn2`` (temporal)
of every ``SpatialVideoTransformer`` (``vwm/modules/attention.py``: ``MemoryEfficientCrossAttention`` with
``action_control=True``; ``vwm/modules/video_attention.py`` passes it to both). ``cond_time_stack_embed`` is built
unconditionally by Vista's ``VideoUNet``, so every Vista file has it. The action projections exist where the
training config had ``action_control: True`` (phase 2 and the released ``vista.safetensors``, not phase 1).

**LoRA.** With ``add_lora: True`` (``configs/training/vista_phase2_stage*.yaml``) every attention, spatial and
temporal, self and cross (``attn1`` and ``attn2`` of ``transformer_blocks.0`` and ``time_stack.0`` of every
transformer, the middle block's included), gets four rank-r adapters (``MemoryEfficientCrossAttention``)::

    q = to_q(x) + q_adapter_up(q_adapter_down(x)) * lora_scale
    k = to_k(c) + k_adapter_up(k_adapter_down(c)) * lora_scale        # c = context (x in self-attention)
    v = to_v(c) + v_adapter_up(v_adapter_down(c)) * lora_scale
    out = to_out(o) + out_adapter_up(out_adapter_down(o)) * lora_scale

``lora_scale`` is 1.0 (the constructor default; no config sets it) and ``bin_to_st.py`` merges with
``W += up @ down``. vdiff fuses self-attention q/k/v into ``qkv`` and cross-attention k/v into ``kv``, so the
adapters become one peft LoRA per vdiff projection whose ``B @ A`` is exactly Vista's update, stacked:

=============================  ====================================  ========================================
vdiff module (peft target)      ``lora_A`` (rank x in)                 ``lora_B`` (out x rank), rank
=============================  ====================================  ========================================
``<attn1>.qkv``                 ``[q_down; k_down; v_down]``           ``blockdiag(q_up, k_up, v_up)``, 3r
``<attn2>.q``                   ``q_down``                             ``q_up``, r
``<attn2>.kv``                  ``[k_down; v_down]``                   ``blockdiag(k_up, v_up)``, 2r
``<attn1|2>.proj``              ``out_down``                           ``out_up``, r
=============================  ====================================  ========================================

with ``lora_alpha = rank x lora_scale`` per module (peft's scaling ``alpha / rank`` is then ``lora_scale``); the
per-module ranks are peft ``rank_pattern`` / ``alpha_pattern`` entries. The adapter is written in peft's format
(``adapter_config.json`` + ``adapter_model.safetensors``, names ``base_model.model.<module>.lora_{A,B}.weight``), which
:func:`vdiff.lit.adapters.load_adapter` and the ``LoRA`` callback's ``path`` load (:mod:`vdiff.weights.peft_files`).

**Files.** The released ``vista.safetensors`` (LoRA merged, EMA copied in, prefixes removed by ``bin_to_st.py``), a
Lightning ``.ckpt`` (``state_dict``), or a DeepSpeed ``pytorch_model.bin`` from ``zero_to_fp32.py`` (every key under
``_forward_module.``, EMA under ``model_ema.`` as LitEma stores it: the model's parameter name without dots,
e.g. ``model_ema.diffusion_modeltime_embed0weight``). Every key of the file is used or skipped by name:

- ``model.diffusion_model.*``: the UNet (read); with ``weights="ema"`` they are skipped, the EMA values are read;
- ``model_ema.*``: the EMA UNet (read with ``weights="ema"``, the default when present, as ``bin_to_st.py``
  does; skipped with ``weights="trained"``), ``model_ema.decay`` / ``model_ema.num_updates`` skipped;
- ``conditioner.*`` (the frozen OpenCLIP image tower, read by :mod:`vdiff.weights.clip`; the concat branch's
  encoder copy) and ``first_stage_model.*`` (the autoencoder, read by :mod:`vdiff.weights.autoencoder`):
  skipped; point a recipe's ``image_encoder`` / ``autoencoder`` paths at the same file;
- anything else: an error naming the file and the keys (``skip_prefixes`` skips more on purpose).

Missing, mis-shaped and unused tensors are raised together (:class:`~vdiff.weights.unet_svd.UNetSVDConversionError`).

Entry points: :func:`read_vista` (state dict in our names + the LoRA adapter), :func:`load_vista_unet` (a built
UNet, adapters merged), :func:`convert_vista` / ``python -m vdiff.weights.vista SRC OUT`` (a vdiff-layout UNet file
that ``SVDModule``/``VistaModule`` ``net_weights`` reads, plus ``<OUT stem>_lora/default/`` when the file has
adapters and ``--lora adapter``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from vdiff.models.actions import VISTA_ACTION_DIM  # k/v_adapter_action_control: nn.Linear(128 * 19, inner, bias=False)
from vdiff.models.unet_svd import UNetSVD, UNetSVDConfig
from vdiff.weights.peft_files import DEFAULT_ADAPTER, PEFT_PREFIX, adapter_folder, write_adapter
from vdiff.weights.safetensors_io import LazyStateDict, resolve_weights_path, save_state_dict
from vdiff.weights.template import VDIFF_CONFIG_KEY, KeyMapper, Rule, build_loaded, stacked
from vdiff.weights.unet_svd import (
    SGM_PREFIX,
    UNetSVDConversionError,
    expected_shapes,
    peer_names,
    without_vista,
)
from vdiff.weights.unet_svd import TARGET as UNET_TARGET

VISTA_REPO = "OpenDriveLab/Vista"
VISTA_COMMIT = "cc9821b4253ca7987c32757613d2fc2448fa9f5d"  # the Vista source these names were read from
UNET_PREFIX = SGM_PREFIX  # "model.diffusion_model.": the UNet's keys in an sgm-layout checkpoint
EMA_PREFIX = "model_ema."
EMA_MODEL = "diffusion_model"  # LitEma tracks the OpenAIWrapper's parameters: "diffusion_model.<name>" without dots
EMA_EXTRA = ("model_ema.decay", "model_ema.num_updates")
TRAINING_PREFIX = "_forward_module."  # DeepSpeed's zero_to_fp32 pytorch_model.bin
SKIPPED_PARTS: dict[str, str] = {
    "conditioner.": "conditioner (OpenCLIP image tower, read by vdiff.weights.clip; the concat encoder copy)",
    "first_stage_model.": "autoencoder (read by vdiff.weights.autoencoder)",
}
LORA_SCALE = 1.0  # MemoryEfficientCrossAttention(lora_scale=1.0); bin_to_st.py merges up @ down unscaled
LORA_ADAPTER = DEFAULT_ADAPTER
# Every attention projection of UNet-SVD: self-attention qkv/proj, cross-attention q/kv/proj (spatial and temporal
# blocks), the network's "attention" LoRA preset. The phase-2 recipes train a LoRA on the same modules.
LORA_TARGETS = UNetSVD.LORA_PRESETS["attention"].modules
_COND_TIME = ("cond_time_embed.", "cond_time_stack_embed.")
_ACTION_KV = ".action_kv.weight"
_LORA_KEY = re.compile(r"^(.*\.)(q|k|v|out)_adapter_(down|up)\.weight$")
_PROJECTIONS = ("q", "k", "v", "out")

WeightsChoice = Literal["auto", "ema", "trained"]
LoraChoice = Literal["adapter", "merge"]


#################################################################################
#                                  Name maps                                    #
#################################################################################


def vista_unet_config(**overrides: Any) -> UNetSVDConfig:
    """Vista's UNet: SVD-XT with the conditioning-frame time MLP and 2432-d action projections (``overrides``
    change fields, e.g. ``action_dim=0`` for a phase-1 file)."""
    fields = {"cond_frame_time_embed": True, "action_dim": VISTA_ACTION_DIM, **overrides}
    return UNetSVDConfig.from_name("svd-xt", **fields)


def vista_names(key: str, config: UNetSVDConfig) -> list[str]:
    """The Vista name(s) (without ``model.diffusion_model.``) of our UNet parameter ``key``; several names are
    stacked on dim 0 into ours (fused projections, ``action_kv``)."""
    if key.startswith(_COND_TIME[0]):
        rest = key[len(_COND_TIME[0]) :]  # mlp.0.weight: time_embed's Linear-SiLU-Linear, sgm's Sequential 0 / 2
        return [_COND_TIME[1] + rest.removeprefix("mlp.")]
    if key.endswith(_ACTION_KV):
        k, v = peer_names(key[: -len(_ACTION_KV)] + ".kv.weight", without_vista(config), "sgm")
        return [k.replace("to_k.weight", "k_adapter_action_control.weight"),
                v.replace("to_v.weight", "v_adapter_action_control.weight")]  # fmt: skip
    return peer_names(key, without_vista(config), "sgm")


def attention_modules(config: UNetSVDConfig) -> dict[str, str]:
    """``{our attention module (e.g. 'down.0.attn.0.blocks.0.attn1'): its Vista name prefix (ending in '.')}`` for
    every attention of the UNet, self (``attn1``) and cross (``attn2``), spatial and temporal."""
    out = {}
    for key in expected_shapes(without_vista(config)):
        if key.endswith((".attn1.proj.weight", ".attn2.proj.weight")):
            module = key[: -len(".proj.weight")]
            (name,) = peer_names(key, without_vista(config), "sgm")
            out[module] = name[: -len("to_out.0.weight")]
    return out


def lora_layout(module: str) -> dict[str, tuple[str, ...]]:
    """``{vdiff projection under module: the Vista projections its adapter stacks}`` for one attention."""
    if module.endswith("attn1"):
        return {"qkv": ("q", "k", "v"), "proj": ("out",)}
    return {"q": ("q",), "kv": ("k", "v"), "proj": ("out",)}


def stack_lora(downs: Sequence[Tensor], ups: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """peft ``(lora_A, lora_B)`` of Vista adapters stacked on one fused projection: ``A = [down_1; ...; down_n]``,
    ``B = blockdiag(up_1, ..., up_n)``, so ``B @ A = [up_1 @ down_1; ...; up_n @ down_n]``."""
    return torch.cat(list(downs), dim=0), torch.block_diag(*ups)


#################################################################################
#                                   Reading                                     #
#################################################################################


@dataclass
class VistaLoRA:
    """Vista's hand-made LoRA as one peft adapter (see the module docstring).

    state_dict: peft-format tensors ``base_model.model.<module>.lora_{A,B}.weight``; rank: Vista's r; scale: the
    ``lora_scale`` the adapters are applied with; ranks: ``{module: rank}`` (3r on ``qkv``, 2r on ``kv``).
    """

    state_dict: dict[str, Tensor]
    rank: int
    scale: float
    ranks: dict[str, int]

    def peft_config(self):
        """The peft ``LoraConfig`` of the adapter: ``LORA_TARGETS``, rank r (3r on ``attn1.qkv``, 2r on
        ``attn2.kv``), ``lora_alpha = rank x scale`` (peft's scaling is then ``scale``), no dropout."""
        from peft import LoraConfig

        r, s = self.rank, self.scale
        ranks = {r"attn1\.qkv": 3 * r, r"attn2\.kv": 2 * r}
        return LoraConfig(r=r, lora_alpha=r * s, target_modules=LORA_TARGETS, lora_dropout=0.0,
                          rank_pattern=ranks, alpha_pattern={k: v * s for k, v in ranks.items()})  # fmt: skip

    def delta(self, module: str) -> Tensor:
        """``scale x B @ A`` of one adapted module (float32): what merging adds to its weight."""
        a = self.state_dict[f"{PEFT_PREFIX}{module}.lora_A.weight"].float()
        b = self.state_dict[f"{PEFT_PREFIX}{module}.lora_B.weight"].float()
        return self.scale * (b @ a)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the adapter in peft's format: ``adapter_config.json`` + ``adapter_model.safetensors``
        (:func:`vdiff.weights.peft_files.write_adapter`)."""
        return write_adapter(folder, self.peft_config(), self.state_dict)


@dataclass
class VistaWeights:
    """A Vista UNet read into our names.

    state_dict: our UNet names (LoRA merged in when ``lora_merged``); config: the UNet's config; path: the file;
    weights: ``ema`` or ``trained`` (which values were read); lora: the adapter (None when the file has none or
    it was merged); lora_merged: whether adapters were folded into ``state_dict``; skipped: ``{reason: keys}``
    of every key of the file that was not read.
    """

    state_dict: dict[str, Tensor]
    config: UNetSVDConfig
    path: Path
    weights: str
    lora: VistaLoRA | None = None
    lora_merged: bool = False
    skipped: dict[str, list[str]] = field(default_factory=dict)


def _source(path: Path) -> LazyStateDict:
    """The tensors of a Vista file by their names without ``_forward_module.`` (DeepSpeed's): names first, shapes from
    the header, tensors on demand; a name given both with and without the prefix is an error naming the keys."""
    source = LazyStateDict(path, rename=lambda key: key.removeprefix(TRAINING_PREFIX))
    if source.clashes:
        raise UNetSVDConversionError(str(path), [], [], source.clashes, hint="keys given with and without "
                                     "_forward_module.", target=UNET_TARGET)  # fmt: skip
    return source


@dataclass
class _Parts:
    """A Vista file's keys by part: the UNet's (``model.diffusion_model.*``), its EMA's (``model_ema.*``) and the
    ones skipped by name (``{reason: keys}``)."""

    unet: list[str]
    ema: list[str]
    skipped: dict[str, list[str]]


def _sort_keys(source: LazyStateDict, skip_prefixes: Sequence[str], where: str) -> _Parts:
    """Every key of the file in its part; a key of no known part is an error naming the file and the keys."""
    parts = _Parts([], [], {})
    unknown = []
    for name in source:
        if name.startswith(UNET_PREFIX):
            parts.unet.append(name)
        elif name in EMA_EXTRA:
            parts.skipped.setdefault("EMA bookkeeping (decay, num_updates)", []).append(name)
        elif name.startswith(EMA_PREFIX):
            parts.ema.append(name)
        elif part := next((p for p in SKIPPED_PARTS if name.startswith(p)), None):
            parts.skipped.setdefault(SKIPPED_PARTS[part], []).append(name)
        elif part := next((p for p in skip_prefixes if name.startswith(p)), None):
            parts.skipped.setdefault(f"skip_prefixes {part!r}", []).append(name)
        else:
            unknown.append(name)
    if unknown:
        raise UNetSVDConversionError(where, [], [], sorted(unknown), hint="keys of no known Vista part; "
                                     "pass skip_prefixes to skip them on purpose", target=UNET_TARGET)  # fmt: skip
    if not parts.unet and not parts.ema:
        raise UNetSVDConversionError(where, [f"{UNET_PREFIX}* (no UNet tensor in the file)"], [], [], target=UNET_TARGET)
    return parts


def _file_name(use_ema: bool) -> Callable[[str], str]:
    """The file key of a Vista UNet name (without ``model.diffusion_model.``): under ``model.diffusion_model.``, or
    LitEma's name without dots under ``model_ema.``."""
    if use_ema:
        return lambda name: EMA_PREFIX + EMA_MODEL + name.replace(".", "")
    return lambda name: UNET_PREFIX + name


def _config_from_file(names: Sequence[str], source: LazyStateDict) -> UNetSVDConfig:
    """Vista's UNet (SVD-XT + the conditioning-frame MLP), with the action width the file's UNet tensors ``names``
    hold (0 without action projections)."""
    actions = sorted(n for n in names if re.search(r"k_adapter_action_control\.?weight$", n))
    return vista_unet_config(action_dim=int(source.shape(actions[0])[1]) if actions else 0)


def read_vista(
    path: str | os.PathLike,
    config: UNetSVDConfig | None = None,
    weights: WeightsChoice = "auto",
    lora: LoraChoice = "adapter",
    lora_scale: float = LORA_SCALE,
    skip_prefixes: Sequence[str] = (),
) -> VistaWeights:
    """Read a LOCAL Vista checkpoint's UNet into our names (see the module docstring for the mapping and the files).

    Args:
        path: ``vista.safetensors``, a Lightning ``.ckpt`` or a DeepSpeed ``pytorch_model.bin``, or a hub id
            (``hf://OpenDriveLab/Vista/vista.safetensors``); a relative path that does not exist is also looked up under
            ``$VDIFF_WEIGHTS``.
        config: the UNet architecture (default: :func:`vista_unet_config` with the file's action width, 0 when
            the file has no action projections). Vista's layers must be on: every Vista file holds
            ``cond_time_stack_embed``.
        weights: ``ema`` (the ``model_ema.*`` values; an error when there are none), ``trained`` or ``auto``
            (EMA when present, as ``bin_to_st.py``).
        lora: for files with Vista's ``*_adapter_down/up``: ``adapter`` (a peft adapter, :class:`VistaLoRA`; the base
            weights stay as stored) or ``merge`` (folded into the base weights, as ``bin_to_st.py``).
        lora_scale: Vista's ``lora_scale`` (1.0 in every Vista config).
        skip_prefixes: further key prefixes to skip on purpose (listed in ``VistaWeights.skipped``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a config without Vista's conditioning-frame MLP, ``weights="ema"`` without EMA tensors.
        UNetSVDConversionError: missing, mis-shaped or unknown tensors, naming the file and the keys.
    """
    if weights not in ("auto", "ema", "trained"):
        raise ValueError(f"read_vista: weights must be 'auto', 'ema' or 'trained', got {weights!r}")
    if lora not in ("adapter", "merge"):
        raise ValueError(f"read_vista: lora must be 'adapter' or 'merge', got {lora!r}")
    resolved = resolve_weights_path(path, what="Vista checkpoint").absolute()
    source = _source(resolved)
    where = f"Vista file {resolved}"
    parts = _sort_keys(source, skip_prefixes, where)
    use_ema = bool(parts.ema) if weights == "auto" else weights == "ema"
    if use_ema and not parts.ema:
        raise ValueError(f"{where}: weights='ema' but the file has no {EMA_PREFIX}* tensors")
    read, other = (parts.ema, parts.unet) if use_ema else (parts.unet, parts.ema)
    if other:
        why = f"trained values ({UNET_PREFIX}*): the EMA values were read" if use_ema else (
            f"EMA values ({EMA_PREFIX}*): weights='trained'")  # fmt: skip
        parts.skipped.setdefault(why, []).extend(other)

    config = config if config is not None else _config_from_file(sorted(read), source)
    if not config.cond_frame_time_embed:
        raise ValueError(
            f"{where}: Vista's UNet always has cond_time_stack_embed (the conditioning frames' time MLP); read it with "
            "a config that has cond_frame_time_embed=True (vdiff.weights.vista.vista_unet_config())"
        )
    name_of = _file_name(use_ema)
    mapper = KeyMapper(source, where, UNET_TARGET)
    ours = {key: mapper.take(key, shape, stacked([name_of(n) for n in vista_names(key, config)], shape))
            for key, shape in expected_shapes(config).items()}  # fmt: skip
    adapter = _read_lora(config, name_of, mapper, lora_scale)
    unused = [name for name in read if name not in mapper.claimed]
    actions = not config.action_dim and any("action_control" in n for n in unused)
    mapper.check(read, hint="the file has action projections: read it with action_dim > 0" if actions else "")

    merged = False
    if adapter is not None and lora == "merge":
        for module in adapter.ranks:
            key = f"{module}.weight"
            ours[key] = (ours[key].float() + adapter.delta(module)).to(ours[key].dtype)
        adapter, merged = None, True
    return VistaWeights(ours, config, resolved, "ema" if use_ema else "trained", adapter, merged, parts.skipped)


def _read_lora(config: UNetSVDConfig, name_of: Callable[[str], str], mapper: KeyMapper, scale: float) -> VistaLoRA | None:
    """Vista's adapters as one peft adapter (None when the file has none): per adapted projection, ``lora_A`` the
    downs stacked, ``lora_B`` the ups block-diagonal (as :func:`stack_lora`); problems go to ``mapper``."""
    modules = attention_modules(config)
    adapters = {(module, proj, side): name_of(f"{prefix}{proj}_adapter_{side}.weight")
                for module, prefix in modules.items() for proj in _PROJECTIONS for side in ("down", "up")}  # fmt: skip
    if not any(name in mapper.source for name in adapters.values()):
        return None
    ranks = {mapper.source.shape(n)[0] for (_, _, side), n in adapters.items() if side == "down" and n in mapper.source}
    if len(ranks) != 1:
        mapper.mismatched.append(f"LoRA ranks differ between adapters: {sorted(ranks)} (one lora_rank per Vista model)")
        return None
    (rank,) = ranks
    shapes = expected_shapes(config)
    state: dict[str, Tensor] = {}
    module_ranks: dict[str, int] = {}
    for module in modules:
        for ours, projections in lora_layout(module).items():
            out_dim, in_dim = shapes[f"{module}.{ours}.weight"]  # the fused projection
            n = len(projections)
            downs = tuple(adapters[(module, p, "down")] for p in projections)
            ups = tuple(adapters[(module, p, "up")] for p in projections)
            name = f"{PEFT_PREFIX}{module}.{ours}"
            a = mapper.take(f"{name}.lora_A.weight", (n * rank, in_dim), Rule(downs, ((rank, in_dim),) * n))
            b = mapper.take(f"{name}.lora_B.weight", (out_dim, n * rank),
                            Rule(ups, ((out_dim // n, rank),) * n, lambda ts: torch.block_diag(*ts)))  # fmt: skip
            if a is not None and b is not None:
                state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = a, b
                module_ranks[f"{module}.{ours}"] = rank * n
    return VistaLoRA(state, rank, float(scale), module_ranks)


#################################################################################
#                                Loading, converting                            #
#################################################################################


def load_vista_unet(
    path: str | os.PathLike,
    config: UNetSVDConfig | None = None,
    weights: WeightsChoice = "auto",
    lora_scale: float = LORA_SCALE,
    dtype: torch.dtype | None = torch.float32,
) -> UNetSVD:
    """A :class:`UNetSVD` with a Vista checkpoint's UNet (adapters merged, as Vista samples), built on the meta
    device and filled with the tensors (cast to ``dtype``; None keeps the file's)."""
    read = read_vista(path, config=config, weights=weights, lora="merge", lora_scale=lora_scale)
    return build_loaded(UNetSVD, read.config, read.state_dict, dtype)


def convert_vista(
    path: str | os.PathLike,
    out: str | os.PathLike,
    config: UNetSVDConfig | None = None,
    weights: WeightsChoice = "auto",
    lora: LoraChoice = "adapter",
    lora_scale: float = LORA_SCALE,
) -> list[Path]:
    """Write a Vista checkpoint's UNet as a vdiff-layout ``.safetensors`` file (config in its metadata: what
    ``net_weights`` of :class:`~vdiff.lit.vista.VistaModule` reads) and, for unmerged adapters, the peft adapter
    folder ``OUT_lora/default/`` (:func:`vdiff.weights.peft_files.adapter_folder`, the rule of every adapter beside
    a weights file); returns the paths written."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"convert_vista: {out} should end in .safetensors")
    read = read_vista(path, config=config, weights=weights, lora=lora, lora_scale=lora_scale)
    metadata = {
        VDIFF_CONFIG_KEY: json.dumps(read.config.to_dict()),
        "vdiff_source": f"{VISTA_REPO} checkpoint {read.path.name}",
        "vdiff_weights": read.weights,
        "vdiff_lora": "merged" if read.lora_merged else ("separate" if read.lora is not None else "none"),
    }
    save_state_dict(read.state_dict, out, metadata=metadata)
    written = [out]
    if read.lora is not None:
        written.append(read.lora.save(adapter_folder(out)))
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m vdiff.weights.vista SRC OUT [--weights ema|trained] [--lora adapter|merge]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m vdiff.weights.vista",
        description="Convert an OpenDriveLab/Vista checkpoint's UNet into a vdiff UNet-SVD file (VistaModule "
        "net_weights); Vista's LoRA adapters go to OUT_lora/default/ in peft's format, or are merged.",
    )
    parser.add_argument("src", help="vista.safetensors (or its hub id hf://OpenDriveLab/Vista/vista.safetensors), "
                        "a Lightning .ckpt or a DeepSpeed pytorch_model.bin")  # fmt: skip
    parser.add_argument("out", help="output .safetensors (vdiff layout, config in the metadata)")
    parser.add_argument("--weights", choices=("auto", "ema", "trained"), default="auto",
                        help="EMA or trained values (auto: EMA when the file has them)")  # fmt: skip
    parser.add_argument("--lora", choices=("adapter", "merge"), default="adapter",
                        help="Vista's adapters (training checkpoints): a peft adapter folder, or merged")  # fmt: skip
    parser.add_argument("--lora-scale", type=float, default=LORA_SCALE)
    parser.add_argument("--action-dim", type=int, default=None,
                        help="action width (default: the file's; 0 when it has no action projections)")  # fmt: skip
    args = parser.parse_args(argv)
    config = vista_unet_config(action_dim=args.action_dim) if args.action_dim is not None else None
    for written in convert_vista(args.src, args.out, config, args.weights, args.lora, args.lora_scale):
        print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "LORA_TARGETS",
    "VISTA_ACTION_DIM",
    "VISTA_COMMIT",
    "VistaLoRA",
    "VistaWeights",
    "attention_modules",
    "convert_vista",
    "load_vista_unet",
    "read_vista",
    "stack_lora",
    "vista_names",
    "vista_unet_config",
]
