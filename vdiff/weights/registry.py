"""Every pretrained file vdiff knows by name: where it comes from, its hash, size, licence and purpose.

One table (:data:`PRESETS`) serves the loaders (:func:`vdiff.weights.safetensors_io.resolve_weights_path` fetches a
URL preset named by its file name on first use), ``vdiff weights list|download|verify`` (:mod:`vdiff.weights.tool`)
and the docs (README "Pretrained weights"). Two kinds of source:

* a Hugging Face hub id, ``hf://ORG/NAME[@REVISION][/PATH]`` (:mod:`vdiff.weights.hub`): resolved through
  ``huggingface_hub`` into its own cache (``$HF_HOME/hub``; ``HF_HUB_OFFLINE``, tokens and ``HF_ENDPOINT`` as for
  every hub user). A recipe names these ids directly (``net_weights: hf://stabilityai/...``); the preset is the
  catalogue entry (``vdiff weights download svd-xt``);
* a plain URL (the metric networks, LPIPS' backbones): downloaded by :mod:`vdiff.weights.download` into one folder,
  :func:`weights_cache_dir` (``$VDIFF_WEIGHTS_CACHE``, else ``$VDIFF_CACHE/weights``, else
  ``~/.cache/vdiff/weights``), under the preset's file name (never a name taken from the server), verified.

Hashes: ``sha256`` is the full digest where the publisher gives one, or the prefix a publisher puts in the file name
and checks itself (torchvision's ``alexnet-owt-7be5be79.pth`` is checked against ``7be5be79`` by torchvision's own
``check_hash``); the download is refused when the digest does not match. Where no publisher states a hash (StyleGAN-V's
I3D, clean-fid's Inception) none is made up: the digest of the first download is recorded beside the file
(``<file>.sha256``) and ``vdiff weights verify`` checks the file against it later; FVD/FID print the file's sha256 with
every score, so a result names the exact network either way. Hub files are stored by ``huggingface_hub`` under the
hub's digest of each (an LFS file's sha256 is its blob name in the cache; the library checks sizes as it downloads);
``vdiff weights verify`` re-hashes them against those names.

LPIPS' linear layers ship inside torchmetrics (``torchmetrics/functional/image/lpips_models/*.pth``): nothing to
fetch. Sizes are approximate (for planning disk space), from the publishers' listings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vdiff.cache import cache_root

HUB_SCHEME = "hf://"
CACHE_ENV = "VDIFF_WEIGHTS_CACHE"  # overrides $VDIFF_CACHE/weights
SVD_LICENCE = (
    "Stability AI Community License; a gated repository: accept it on the model page, then `huggingface-cli login`"
)
SVD_RECIPES = "recipes svd_img2vid, svd_interpolate, svd_multiview, svd_temporal_decoder"


@dataclass(frozen=True)
class WeightsPreset:
    """A named pretrained file or folder.

    name:     what ``vdiff weights download NAME`` and a bare weights path accept (URL presets only) take.
    source:   ``hf://ORG/NAME[/PATH]`` or an ``https://`` URL.
    file:     for a URL preset, the file name in :func:`weights_cache_dir` (and the name a weights path may give).
    sha256:   full hex digest, a hex prefix checked as torchvision checks its file names, or None (none published).
    size:     approximate download size, for planning.
    licence:  the terms it comes under (where to accept them for gated repositories).
    purpose:  what vdiff uses it for.
    note:     where the hash comes from, or why there is none.
    torch_hub: a torchvision file, also found where torchvision keeps it (``$TORCH_HOME/hub/checkpoints/``).
    """

    name: str
    source: str
    purpose: str
    licence: str
    size: str
    file: str = ""
    sha256: str | None = None
    note: str = ""
    torch_hub: bool = False

    @property
    def is_hub(self) -> bool:
        return self.source.startswith(HUB_SCHEME)

    @property
    def pin(self) -> str:
        """How the file is checked: ``sha256 <digest>``, ``sha256 prefix <p>``, or why it is not pinned."""
        if self.is_hub:
            return "each file against the hub's digest of it (its blob name in the cache) by `vdiff weights verify`"
        if self.sha256 is None:
            return "not pinned (no published hash): the first download's sha256 is recorded beside it"
        return f"sha256 {self.sha256}" if len(self.sha256) == 64 else f"sha256 prefix {self.sha256}"


def _torchvision(name: str, file: str, prefix: str, size: str, net: str) -> WeightsPreset:
    return WeightsPreset(
        name=name,
        source=f"https://download.pytorch.org/models/{file}",
        file=file,
        sha256=prefix,
        size=size,
        licence="BSD-3-Clause (torchvision); ImageNet-trained",
        purpose=f"LPIPS ({net}) backbone: VideoQuality/vdiff evaluate --lpips {net}, the autoencoder loss (lpips_net: {net})",
        note="the sha256 prefix in torchvision's file name, which torchvision itself checks (check_hash=True)",
        torch_hub=True,
    )


def _vdt_release(name: str, drive_id: str, what: str) -> WeightsPreset:
    """A RERV/VDT release: a Google Drive file, fetched through Drive's direct-download address (``confirm=t`` skips
    the virus-scan page that large files get; a page instead of the file is refused by the downloader)."""
    return WeightsPreset(
        name=name,
        source=f"https://drive.usercontent.google.com/download?id={drive_id}&export=download&confirm=t",
        file=f"{name.replace('-', '_')}.pt",
        size="not published (a VDT-L/2 training checkpoint: several GB)",
        licence="CC BY-NC 4.0 (RERV/VDT's LICENSE.txt): non-commercial use only",
        purpose=f"{what}: a DiT-style {{model, ema, args}} file; load_vdt_checkpoint(VDT(config), {name!r}) reads "
        "its EMA weights strictly (vdiff.weights.vdt), with the VDT-L/2 config of the reference's inference notebook",
        note="RERV/VDT publishes no hash for it",
    )


PRESETS: dict[str, WeightsPreset] = {
    p.name: p
    for p in (
        WeightsPreset(
            "svd",
            "hf://stabilityai/stable-video-diffusion-img2vid",
            f"Stable Video Diffusion, 14 frames: the diffusers pipeline (the fp32 unet/, vae/, image_encoder/; {SVD_RECIPES})",
            SVD_LICENCE,
            "9.0 GB",
        ),
        WeightsPreset(
            "svd-file",
            "hf://stabilityai/stable-video-diffusion-img2vid/svd.safetensors",
            "Stable Video Diffusion, 14 frames: the original sgm single file (UNet, OpenCLIP image tower, autoencoder)",
            SVD_LICENCE,
            "9.6 GB",
        ),
        WeightsPreset(
            "svd-xt",
            "hf://stabilityai/stable-video-diffusion-img2vid-xt",
            "Stable Video Diffusion XT, 25 frames: the diffusers pipeline (the fp32 unet/, vae/, image_encoder/; recipe "
            "svd_xt)",
            SVD_LICENCE,
            "9.0 GB",
        ),
        WeightsPreset(
            "svd-xt-file",
            "hf://stabilityai/stable-video-diffusion-img2vid-xt/svd_xt.safetensors",
            "SVD-XT's original sgm single file: Vista's starting point (recipes vista, vista_phase2, vista_phase2_hires)",
            SVD_LICENCE,
            "9.6 GB",
        ),
        WeightsPreset(
            "vista",
            "hf://OpenDriveLab/Vista/vista.safetensors",
            "Vista's released driving world model (UNet with actions, OpenCLIP tower, autoencoder; recipe "
            "vista_nuscenes_eval, which reads its UNet directly with net_weights_layout: vista)",
            "see the OpenDriveLab/Vista model card; a fine-tune of SVD-XT, whose licence applies to it",
            "10 GB",
        ),
        WeightsPreset(
            "sd21",
            "hf://stabilityai/stable-diffusion-2-1",
            "Stable Diffusion 2.1 (768-v): its unet/ is inflated into a video UNet, its vae/ encodes (recipe "
            "svd_from_sd21 names hf://stabilityai/stable-diffusion-2-1/unet and .../vae: 3.8 GB of it)",
            "CreativeML Open RAIL++-M",
            "5.2 GB",
        ),
        WeightsPreset(
            "openclip-vit-h-14",
            "hf://laion/CLIP-ViT-H-14-laion2B-s32B-b79K/open_clip_pytorch_model.bin",
            "OpenCLIP ViT-H/14 (laion2B): the CLIP image tower SVD conditions on (recipe svd_from_sd21)",
            "MIT",
            "3.9 GB",
        ),
        WeightsPreset(
            "sd-vae-ft-mse",
            "hf://stabilityai/sd-vae-ft-mse",
            "SD's KL-f8 autoencoder, decoder fine-tuned with MSE: VDT's latent space (recipe vdt_cityscapes)",
            "MIT",
            "335 MB",
        ),
        _vdt_release(
            "vdt-sky-timelapse",
            "1WIAOm4n0HkmOHMhUj3y6wLLemtz_Xj8b",
            "VDT's released Sky Time-Lapse checkpoint (unified generation: prediction, backward, unconditional, "
            "interpolation, spatial-temporal masks)",
        ),
        _vdt_release(
            "vdt-physion-collide",
            "108XteBW8omQhGOqwkS4Rnd1YfzOxN3YL",
            "VDT's released Physion-Collision checkpoint (conditional generation: video prediction)",
        ),
        WeightsPreset(
            "i3d-torchscript",
            "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1",
            "FVD: StyleGAN-V's TorchScript Kinetics-400 I3D (VideoQuality fvd_weights, vdiff evaluate --fvd-weights)",
            "Apache-2.0 (DeepMind's Kinetics-400 I3D, exported by StyleGAN-V)",
            "50 MB",
            file="i3d_torchscript.pt",
            note="StyleGAN-V publishes no hash for it",
        ),
        WeightsPreset(
            "clean-fid-inception",
            "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
            "FID: clean-fid's TorchScript Inception (VideoQuality fid_weights, vdiff evaluate --fid-weights)",
            "Apache-2.0 (TensorFlow's Inception v3, exported by NVIDIA's StyleGAN2-ADA)",
            "95 MB",
            file="inception-2015-12-05.pt",
            note="clean-fid and StyleGAN2-ADA publish no hash for it",
        ),
        WeightsPreset(
            "torch-fidelity-inception",
            "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
            "weights-inception-2015-12-05-6726825d.pth",
            "FID with --fid-backend torchmetrics: torch-fidelity's Inception weights",
            "Apache-2.0 (TensorFlow's Inception v3, ported by torch-fidelity)",
            "95 MB",
            file="weights-inception-2015-12-05-6726825d.pth",
            note="the 6726825d in its name is not checked by torch-fidelity, so it is not taken as a pin",
        ),
        _torchvision("lpips-alex", "alexnet-owt-7be5be79.pth", "7be5be79", "233 MB", "alex"),
        _torchvision("lpips-vgg", "vgg16-397923af.pth", "397923af", "528 MB", "vgg"),
        _torchvision("lpips-squeeze", "squeezenet1_1-b8a52dc0.pth", "b8a52dc0", "4.7 MB", "squeeze"),
    )
}


def weights_cache_dir() -> Path:
    """Where URL presets are downloaded: ``$VDIFF_WEIGHTS_CACHE``, else ``$VDIFF_CACHE/weights``, else
    ``$XDG_CACHE_HOME/vdiff/weights`` (``~/.cache/vdiff/weights``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return cache_root() / "weights"


def get_preset(name: str) -> WeightsPreset:
    """The preset called ``name`` (or whose URL file name is ``name``); ValueError listing the known names."""
    found = PRESETS.get(name) or url_preset(name)
    if found is None:
        raise ValueError(f"no weights preset {name!r}; known: {', '.join(PRESETS)} (or give a hf://ORG/NAME id)")
    return found


def url_preset(name: str | os.PathLike) -> WeightsPreset | None:
    """The URL preset a bare weights path names, by preset name or file name (``i3d_torchscript.pt``); None for a
    path with a folder in it or an unknown name (a path that names a folder is the user's own file)."""
    text = os.fspath(name)
    if not text or os.sep in text or "/" in text:
        return None
    return next((p for p in PRESETS.values() if not p.is_hub and text in (p.name, p.file)), None)


def cached_file(preset: WeightsPreset) -> Path:
    """Where a URL preset's file is (or will be) in :func:`weights_cache_dir`."""
    if preset.is_hub:
        raise ValueError(f"{preset.name} is a hub preset ({preset.source}): it lives in the Hugging Face cache")
    return weights_cache_dir() / preset.file


def fetch(preset: WeightsPreset | str, progress: bool = True) -> Path:
    """The local path of a preset: a URL preset's :func:`local_file` (else downloaded and verified), a hub preset's
    file or folder in the Hugging Face cache (downloaded on first use). Errors are one line naming what to fetch and
    where (:class:`vdiff.weights.download.WeightsUnavailableError` when offline)."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if preset.is_hub:
        from vdiff.weights.hub import resolve_hub_path

        return resolve_hub_path(preset.source, what=preset.name)
    from vdiff.weights.download import download

    found = local_file(preset)
    if found is not None:
        return found
    return download(preset.source, cached_file(preset), preset.sha256, progress=progress,
                    hint=f"vdiff weights download {preset.name}")  # fmt: skip


def local_file(preset: WeightsPreset) -> Path | None:
    """A URL preset's file where vdiff finds it without downloading, or None: for torchvision's files (LPIPS'
    backbones) where torchvision keeps them (``$TORCH_HOME/hub/checkpoints/``) first, then the weights cache."""
    places = [cached_file(preset)]
    if preset.torch_hub:
        import torch

        places.insert(0, Path(torch.hub.get_dir()) / "checkpoints" / preset.file)
    return next((p for p in places if p.is_file()), None)


def lpips_backbone(net: str) -> Path:
    """The torchvision backbone file of LPIPS ``net`` (``alex``, ``vgg``, ``squeeze``): :func:`local_file` of the
    ``lpips-<net>`` preset, else downloaded into the weights cache on first use (hash checked)."""
    return fetch(f"lpips-{net}")
