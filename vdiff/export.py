"""``vdiff export``: the network of a training checkpoint as a weights file.

    vdiff export [--ema] [--merge-lora] [--layout vdiff|diffusers|sgm] [--convert-norm-eps] CKPT OUT

* Diffusion modules (anything :func:`~vdiff.lit.module_loading.load_module` loads, e.g.
  ``VDTModule``): OUT is a ``.safetensors`` file of the network (``module.net``) under vdiff's names,
  which load strictly into the network class (for VDT: :func:`vdiff.weights.vdt.load_vdt_checkpoint`);
  the network's config is in the metadata (``vdiff_config``, JSON) beside ``vdiff_module`` and
  ``vdiff_weights`` (``ema`` or ``trained``), and so is what rebuilding the module needs
  (``vdiff_checkpoint``: hyperparameters, clip size, autoencoder and image encoder entries and the weights
  the checkpoint stores outside the network; :mod:`vdiff.lit.exported_module`), so
  ``vdiff sample --ckpt OUT`` samples as from the checkpoint. VDT has no diffusers layout.
* SVD and Vista UNets also export in the diffusers (a folder) and sgm layouts. vdiff's UNet-SVD presets use
  sgm's ResBlock GroupNorm epsilons, which diffusers' UNet does not: ``--convert-norm-eps`` exports them
  anyway, for diffusers' epsilons (the model then computes slightly differently); without it the export
  is refused.
* ``AutoencoderModule`` checkpoints: the autoencoder in the vdiff layout (a ``.safetensors`` file, config
  in its metadata), the diffusers layout (a folder: ``config.json`` + ``diffusion_pytorch_model.safetensors``)
  or sgm's (:func:`vdiff.weights.autoencoder.save_autoencoder`).
* ``--ema``: the EMA weights (``checkpoint["ema_state_dict"]``; an error when the checkpoint has none)
  instead of the trained ones. Parameters the EMA did not track (a frozen base under LoRA) keep the
  checkpoint's values.
* LoRA checkpoints (``checkpoint["vdiff_lora"]``): with ``--merge-lora`` the adapters are merged into
  the base weights and OUT is a plain network; without it OUT holds the base network (the adapters
  unloaded, not merged) and the adapters go beside it in peft's format,
  ``<OUT stem>_lora/<adapter>/adapter_model.safetensors`` + ``adapter_config.json``
  (:func:`vdiff.weights.peft_files.adapter_folder`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

LAYOUTS = ("vdiff", "diffusers", "sgm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", help="checkpoint written by `vdiff fit` (e.g. runs/x/version_0/checkpoints/last.ckpt)")
    parser.add_argument("out", help="output .safetensors file (a folder for --layout diffusers)")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights (the checkpoint must have them)")
    parser.add_argument("--merge-lora", action="store_true", help="merge LoRA adapters into the base weights")
    parser.add_argument("--layout", choices=LAYOUTS, default="vdiff",
                        help="weights layout: vdiff names (default); diffusers or sgm for autoencoders and UNet-SVD")  # fmt: skip
    parser.add_argument("--convert-norm-eps", action="store_true",
                        help="UNet-SVD to diffusers/sgm: export for the layout's own GroupNorm epsilons even when the "
                             "network's differ (the default config's are sgm's; diffusers then computes slightly "
                             "differently)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    written = export(args.ckpt, args.out, ema=args.ema, merge_lora=args.merge_lora, layout=args.layout,
                     convert_norm_eps=args.convert_norm_eps)  # fmt: skip
    for path in written:
        print(f"wrote {path}")
    return 0


def export(
    ckpt: str | Path,
    out: str | Path,
    ema: bool = False,
    merge_lora: bool = False,
    layout: str = "vdiff",
    convert_norm_eps: bool = False,
) -> list[Path]:
    """Write the checkpoint's network to ``out`` (see the module docstring); returns the paths written."""
    from vdiff.lit.adapters import LORA_KEY
    from vdiff.lit.checkpointing import EMA_KEY
    from vdiff.lit.module_loading import checkpoint_module_class
    from vdiff.lit.safe_loading import load_checkpoint

    ckpt, out = Path(ckpt), Path(out)
    if not ckpt.is_file():
        raise FileNotFoundError(f"vdiff export: no checkpoint file at {ckpt}")
    if layout not in LAYOUTS:
        raise ValueError(f"vdiff export: unknown layout {layout!r}; choose from {LAYOUTS}")
    checkpoint = load_checkpoint(ckpt, mmap=True)  # entries only; refuses files that would run code
    cls = checkpoint_module_class(checkpoint, ckpt)  # a weights file, or a class that cannot be imported: refused
    class_path, class_name = checkpoint["vdiff_module"], cls.__name__
    if ema and not checkpoint.get(EMA_KEY):
        raise ValueError(
            f"{ckpt}: --ema but the checkpoint has no EMA weights ('{EMA_KEY}'); train with the EMA callback"
        )
    lora = checkpoint.get(LORA_KEY)
    if merge_lora and not lora:
        raise ValueError(f"{ckpt}: --merge-lora but the checkpoint has no LoRA adapters ('{LORA_KEY}')")

    from vdiff.lit.autoencoder import AutoencoderModule

    if issubclass(cls, AutoencoderModule):
        if lora:
            raise ValueError(f"{ckpt}: LoRA adapters on an autoencoder are not supported by vdiff export")
        from vdiff.lit.autoencoder import load_autoencoder_from_checkpoint
        from vdiff.weights.autoencoder import save_autoencoder

        return [save_autoencoder(load_autoencoder_from_checkpoint(ckpt, use_ema=ema), out, layout=layout)]

    from vdiff.lit.svd import SVDModule

    if layout != "vdiff" and not issubclass(cls, SVDModule):  # SVD's UNet, also in VistaModule or a user's subclass
        raise ValueError(f"vdiff export: {class_name}'s network has no {layout} layout; use --layout vdiff")
    if layout != "vdiff":  # UNet-SVD: diffusers folder or sgm single file (vdiff.weights.unet_svd)
        return _export_unet_svd(ckpt, out, ema, merge_lora, lora, layout, convert_norm_eps)
    if out.suffix != ".safetensors":
        raise ValueError(f"vdiff export: {out} should end in .safetensors")
    from vdiff.lit.adapters import adapter_names, save_adapter, unload_adapters
    from vdiff.lit.exported_module import ENTRIES_KEY, module_entries
    from vdiff.lit.module_loading import load_module
    from vdiff.weights.peft_files import adapter_folder
    from vdiff.weights.safetensors_io import save_state_dict

    module = load_module(str(ckpt), map_location="cpu", use_ema=ema)
    entries = module_entries(checkpoint, module.state_dict(), lora if not merge_lora else None)
    del checkpoint
    net = module.net
    written: list[Path] = []
    if lora and not merge_lora:
        for name in adapter_names(net):
            written.append(save_adapter(net, name, adapter_folder(out, name)))
    if lora:
        unload_adapters(net, merge=merge_lora)
    metadata = {"vdiff_module": class_path, "vdiff_weights": "ema" if ema else "trained", ENTRIES_KEY: entries}
    if lora:
        metadata["vdiff_lora"] = "merged" if merge_lora else "separate"
    config = module.network_config() if hasattr(module, "network_config") else None
    if dataclasses.is_dataclass(config):
        metadata["vdiff_config"] = json.dumps(dataclasses.asdict(config))
    save_state_dict(net.state_dict(), out, metadata=metadata)
    return [out, *written]


def _export_unet_svd(
    ckpt: Path, out: Path, ema: bool, merge_lora: bool, lora: bool, layout: str, convert_norm_eps: bool
) -> list[Path]:
    """An SVDModule's UNet in the diffusers (a ``unet/``-style folder) or sgm (single file) layout."""
    from vdiff.lit.adapters import unload_adapters
    from vdiff.lit.module_loading import load_module
    from vdiff.weights.unet_svd import save_unet_svd

    if lora and not merge_lora:
        raise ValueError("vdiff export: the diffusers/sgm layouts hold plain weights; pass --merge-lora")
    module = load_module(str(ckpt), map_location="cpu", use_ema=ema)
    if lora:
        unload_adapters(module.net, merge=True)
    return [save_unet_svd(module.net, out, layout=layout, convert_norm_eps=convert_norm_eps)]

