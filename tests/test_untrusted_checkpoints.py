"""No code runs from a checkpoint someone sends you.

Every entry point that reads a checkpoint is fed a file whose pickle calls ``exec`` (``Evil.__reduce__``), as a
malicious ``torch.save`` would: ``vdiff sample --ckpt``, ``vdiff export``, ``vdiff encode --ckpt``,
``EvaluateCheckpoint`` (and its EMA check), ``load_module``, ``vdiff consolidate`` (``meta.pt``, DCP's
``.metadata`` index and its non-tensor entries) and ``vdiff fit --ckpt_path`` (a file, and ``last``). After each,
the marker file the payload would write does not exist, and the error names the file and the refused object.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.lit.helpers import TINY_VDT, quiet_trainer, tiny_synthetic_data
from vdiff.cli import main
from vdiff.lit.safe_loading import UnsafeCheckpointError, load_checkpoint

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
ROOT = Path(__file__).resolve().parents[1]


class Evil:
    """Unpickling it writes ``marker``: what a malicious checkpoint does (any code could run there)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def vdiff_like(payload: object) -> dict:
    """A checkpoint with vdiff's entries, the payload where a Python-built module keeps its config objects."""
    return {
        "vdiff_module": "vdiff.lit.vdt.VDTModule",
        "epoch": 0,
        "global_step": 2,
        "state_dict": {"net.w": torch.zeros(2)},
        "hyper_parameters": {"net": payload},
        "ema_state_dict": {"net.w": torch.zeros(2)},
    }


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "pwned"


@pytest.fixture
def evil(tmp_path, marker) -> Path:
    path = tmp_path / "evil.ckpt"
    torch.save(vdiff_like(Evil(marker)), path)
    return path


def assert_refused(message: str, path: Path, marker: Path) -> None:
    assert not marker.exists(), "the checkpoint's code ran"
    assert str(path) in message and "refused to load" in message and "`builtins.exec`" in message, message


def test_load_checkpoint_refuses_and_names_the_file_and_object(evil, marker):
    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint(evil, mmap=True)
    assert_refused(str(err.value), evil, marker)
    assert isinstance(err.value, ValueError)  # the tools print ValueErrors as one line


def test_load_module_refuses(evil, marker):
    from vdiff.lit.module_loading import load_module

    with pytest.raises(UnsafeCheckpointError) as err:
        load_module(str(evil))
    assert_refused(str(err.value), evil, marker)


def test_evaluate_checkpoint_and_its_ema_check_refuse(evil, marker):
    from vdiff.callbacks.checkpoint_eval import EvaluateCheckpoint
    from vdiff.lit.checkpointing import has_ema_weights

    trainer = SimpleNamespace(checkpoint_callback=SimpleNamespace(last_model_path=str(evil)))
    with pytest.raises(UnsafeCheckpointError) as err:
        EvaluateCheckpoint().on_fit_end(trainer, SimpleNamespace(device=torch.device("cpu")))
    assert_refused(str(err.value), evil, marker)
    with pytest.raises(UnsafeCheckpointError) as err:
        has_ema_weights(str(evil))
    assert_refused(str(err.value), evil, marker)


def test_vdiff_sample_refuses(evil, marker, tmp_path):
    argv = ["sample", "--ckpt", str(evil), "--input", str(tmp_path / "in.mp4"), "--out", str(tmp_path / "out")]
    with pytest.raises(UnsafeCheckpointError) as err:
        main(argv)
    assert_refused(str(err.value), evil, marker)
    assert not (tmp_path / "out").exists()


def test_vdiff_export_refuses(evil, marker, tmp_path):
    with pytest.raises(UnsafeCheckpointError) as err:
        main(["export", str(evil), str(tmp_path / "x.safetensors")])
    assert_refused(str(err.value), evil, marker)
    assert not (tmp_path / "x.safetensors").exists()


def test_vdiff_encode_refuses_an_autoencoder_checkpoint(evil, marker, tmp_path):
    argv = ["encode", "--input", str(tmp_path / "shards"), "--out", str(tmp_path / "latents"), "--ckpt", str(evil)]
    with pytest.raises(UnsafeCheckpointError) as err:
        main(argv)
    assert_refused(str(err.value), evil, marker)
    assert not (tmp_path / "latents").exists()


def sharded_folder(tmp_path: Path, extra: dict | None = None) -> Path:
    """A small DCP checkpoint folder in FSDPStrategy's layout, with a plain meta.pt."""
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "sharded.ckpt"
    dcp.save({"model": {"net.w": torch.ones(3)}, **(extra or {})}, checkpoint_id=folder, no_dist=True)
    torch.save({"epoch": 0, "global_step": 2, "vdiff_module": "vdiff.lit.vdt.VDTModule"}, folder / "meta.pt")
    return folder


@pytest.mark.parametrize("where", ["meta.pt", ".metadata", "entry"])
def test_vdiff_consolidate_refuses(where, marker, tmp_path):
    import pickle

    from vdiff.consolidate import consolidate

    folder = sharded_folder(tmp_path, {"extra": Evil(marker)} if where == "entry" else None)
    if where == "meta.pt":
        torch.save(vdiff_like(Evil(marker)), folder / "meta.pt")
    elif where == ".metadata":
        (folder / ".metadata").write_bytes(pickle.dumps(Evil(marker)))
    named = {"meta.pt": folder / "meta.pt", ".metadata": folder / ".metadata", "entry": f"{folder} (entry extra)"}
    out = tmp_path / "full.ckpt"
    with pytest.raises(UnsafeCheckpointError) as err:
        consolidate(folder, out)  # what `vdiff consolidate FOLDER OUT` runs
    assert_refused(str(err.value), named[where], marker)
    assert not out.exists()


def test_vdiff_consolidate_still_reads_a_clean_folder(tmp_path):
    folder = sharded_folder(tmp_path, {"extra": {"lr": 0.1, "name": "x", "betas": (0.9, 0.99)}})
    assert main(["consolidate", str(folder), str(tmp_path / "full.ckpt")]) == 0
    checkpoint = load_checkpoint(tmp_path / "full.ckpt")
    assert torch.equal(checkpoint["state_dict"]["net.w"], torch.ones(3)) and checkpoint["global_step"] == 2


def test_vdiff_fit_ckpt_path_refuses_before_training(evil, marker, tmp_path):
    from vdiff.lit.cli import RecipeError

    runs, cache = tmp_path / "runs", tmp_path / "cache"
    common = ["fit", "-c", str(QUICKSTART), *TINY_VDT, *tiny_synthetic_data(cache), *quiet_trainer(runs)]
    with pytest.raises(RecipeError) as err:
        main([*common, "--ckpt_path", str(evil)])
    assert_refused(str(err.value), evil, marker)
    # `--ckpt_path last` finds the run's last.ckpt: the same refusal, before anything is trained or generated.
    last = runs / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(evil.read_bytes())
    with pytest.raises(RecipeError) as err:
        main([*common, "--ckpt_path", "last"])
    assert_refused(str(err.value), last, marker)
    assert not cache.exists()


def family_hparams() -> dict:
    """The config objects Python-built modules of every family keep in their hyperparameters (SVD/Vista, VDT,
    the autoencoder; found by saving each family's checkpoints): what the allow-list must cover."""
    from vdiff.diffusion.ddpm import GaussianDiffusion
    from vdiff.diffusion.edm import EDMDiffusion, LogNormalSigma, VScalingPrecond
    from vdiff.diffusion.guidance import LinearCFG, TriangleCFG, VanillaCFG
    from vdiff.diffusion.masks import MaskSpec
    from vdiff.diffusion.sampling import SamplerConfig
    from vdiff.lit.evaluation import EvalProtocol
    from vdiff.lit.svd import SVDConditioning
    from vdiff.models.autoencoder import AutoencoderConfig
    from vdiff.models.conditioners import CLIPImageEmbedderConfig
    from vdiff.models.unet_svd import UNetSVDConfig
    from vdiff.models.vdt import VDTConfig

    return dict(
        net=UNetSVDConfig(), conditioning=SVDConditioning(cond_aug_lognormal=(-3.0, 0.5)),
        guidance=[TriangleCFG(1.0, 2.5), LinearCFG(1.0, 2.0), VanillaCFG(2.0)],
        diffusion=[EDMDiffusion(VScalingPrecond(), LogNormalSigma()), EDMDiffusion(), GaussianDiffusion()],
        sampler=SamplerConfig(), evaluation=EvalProtocol(), vdt=VDTConfig(), autoencoder=AutoencoderConfig(),
        image_encoder=CLIPImageEmbedderConfig(), mask_specs={"p": MaskSpec("prediction")},
    )


def test_the_allow_list_covers_the_config_objects_of_every_family(tmp_path):
    from fractions import Fraction

    hparams = family_hparams()
    torch.save({"hyper_parameters": hparams}, tmp_path / "configs.ckpt")
    loaded = load_checkpoint(tmp_path / "configs.ckpt")["hyper_parameters"]
    assert {k: repr(v) for k, v in loaded.items() if k not in ("guidance", "diffusion")} == {
        k: repr(v) for k, v in hparams.items() if k not in ("guidance", "diffusion")}  # dataclasses: by value
    assert [vars(g) for g in loaded["guidance"]] == [vars(g) for g in hparams["guidance"]]
    assert [type(d.precond) for d in loaded["diffusion"][:2]] == [type(d.precond) for d in hparams["diffusion"][:2]]
    torch.save({"hyper_parameters": {"net": Fraction(1, 3)}}, tmp_path / "other.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="`fractions.Fraction`"):
        load_checkpoint(tmp_path / "other.ckpt")


def test_a_checkpoint_from_before_the_denoiser_rename_loads(tmp_path):
    """EDM's ``PreconditionedDenoiser`` was ``vdiff.diffusion.edm.Denoiser``: an EDMDiffusion pickled then names
    the old path, and still loads (as the new class) although that name no longer exists."""
    from vdiff.diffusion import edm

    cls = edm.PreconditionedDenoiser
    cls.__name__ = cls.__qualname__ = "Denoiser"  # pickle the class under its old name, as checkpoints did then
    edm.Denoiser = cls
    try:
        torch.save({"hyper_parameters": {"diffusion": edm.EDMDiffusion(edm.VScalingPrecond())}}, tmp_path / "old.ckpt")
    finally:
        cls.__name__ = cls.__qualname__ = "PreconditionedDenoiser"
        del edm.Denoiser
    assert b"vdiff.diffusion.edm\nDenoiser\n" in (tmp_path / "old.ckpt").read_bytes()  # the pickle's GLOBAL
    diffusion = load_checkpoint(tmp_path / "old.ckpt")["hyper_parameters"]["diffusion"]
    assert type(diffusion.denoiser) is cls and isinstance(diffusion.denoiser.precond, edm.VScalingPrecond)


@pytest.mark.slow
def test_the_allow_list_covers_every_family_before_its_module_is_imported(tmp_path):
    """A checkpoint is read before the class that wrote it is imported: in a fresh interpreter that has
    imported only the loader, the config objects of every family load (a separate process: ~10 s)."""
    hparams = family_hparams()
    torch.save({"hyper_parameters": hparams}, tmp_path / "configs.ckpt")
    script = """
import sys
import vdiff.lit.safe_loading as safe
assert not [m for m in sys.modules if m.startswith(("vdiff.lit.", "vdiff.models", "vdiff.diffusion"))
            and m != "vdiff.lit.safe_loading"], sorted(sys.modules)
h = safe.load_checkpoint(sys.argv[1])["hyper_parameters"]
print(sorted((k, type(v).__name__) for k, v in h.items()))
print(h["conditioning"].cond_aug_lognormal, h["guidance"][0].max_scale, type(h["diffusion"][0].precond).__name__)
"""
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "configs.ckpt")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    types, values = result.stdout.splitlines()
    assert types == str(sorted((k, type(v).__name__) for k, v in hparams.items()))
    assert values == "(-3.0, 0.5) 2.5 VScalingPrecond"


@pytest.mark.parametrize("where", [".metadata", "entry", "meta.pt"])
def test_vdiff_fit_ckpt_path_refuses_a_sharded_folder_before_training(where, marker, tmp_path):
    """Resuming from a sharded (DCP) folder: Lightning's loader unpickles its `.metadata` and non-tensor entries
    without limits, so the folder is checked first (only those parts are read) and refused in one message."""
    import pickle

    from vdiff.lit.cli import RecipeError

    folder = sharded_folder(tmp_path, {"extra": Evil(marker)} if where == "entry" else None)
    if where == ".metadata":
        (folder / ".metadata").write_bytes(pickle.dumps(Evil(marker)))
    elif where == "meta.pt":
        torch.save(vdiff_like(Evil(marker)), folder / "meta.pt")
    named = {"meta.pt": folder / "meta.pt", ".metadata": folder / ".metadata", "entry": f"{folder} (entry extra)"}
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    with pytest.raises(RecipeError) as err:
        main(["fit", "-c", str(QUICKSTART), *TINY_VDT, *tiny_synthetic_data(cache), *quiet_trainer(runs),
              "--ckpt_path", str(folder)])  # fmt: skip
    assert_refused(str(err.value), named[where], marker)
    assert not cache.exists()


def test_a_clean_sharded_folder_passes_the_check(tmp_path):
    from vdiff.lit.checkpointing import checkpoint_position

    folder = sharded_folder(tmp_path, {"extra": {"lr": 0.1, "name": "x", "betas": (0.9, 0.99)}})
    assert checkpoint_position(str(folder)) == "epoch 0, step 2"
