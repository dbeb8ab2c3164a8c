"""Every `vdiff` command answers a user's mistake the same way: one line `vdiff TOOL: error: ...` naming the
file or option, exit status 2, no traceback (VDIFF_DEBUG=1 shows it); a bug keeps its traceback.

The commands run as from the shell (`main()` reading `sys.argv`), in this process: called with `argv`,
`main` lets errors propagate (tests and notebooks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch  # noqa: F401  imported before any capsys: Lightning's log handler keeps the real stderr
import pytest
import torch
import yaml
from safetensors.torch import save_file

from tests.convert.helpers import moving_video
from vdiff.cli import main
from vdiff.data.video_io import encode_video

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"


def shell(monkeypatch, capsys, *args: str | Path) -> tuple[int, str]:
    """Exit status and stderr of `vdiff ARGS` as typed in a shell."""
    monkeypatch.setattr(sys, "argv", ["vdiff", *map(str, args)])
    monkeypatch.delenv("VDIFF_DEBUG", raising=False)
    code = main()
    return code, capsys.readouterr().err


def one_error_line(err: str, tool: str) -> str:
    """The single `vdiff TOOL: error:` line of stderr; nothing else on stderr, no traceback."""
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vdiff {tool}: error: "), err
    return lines[0]


def clip_folder(folder: Path, names: tuple[str, ...] = ("a", "b")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(names):
        (folder / f"{name}.mp4").write_bytes(encode_video(moving_video(seed, 4, height=16, width=16), 10.0))
    return folder


@pytest.fixture
def files(tmp_path):
    """A foreign checkpoint (its class cannot be imported), a VDT checkpoint's entries, an exported weights file."""
    torch.save({"vdiff_module": "mypkg_not_installed.models.MyModule", "state_dict": {}}, tmp_path / "foreign.ckpt")
    torch.save({"vdiff_module": "vdiff.lit.vdt.VDTModule", "state_dict": {}}, tmp_path / "vdt.ckpt")
    save_file({"w": torch.zeros(2)}, tmp_path / "net.safetensors")
    return tmp_path


# (tool, arguments with {t} = the test's folder, what the line must name)
MISTAKES = [
    ("sample", "--ckpt {t}/nope.ckpt --input x --out {t}/o", "{t}/nope.ckpt"),
    ("sample", "--ckpt {t}/net.safetensors --input x --out {t}/o", "{t}/net.safetensors is a weights file"),
    ("sample", "--ckpt {t}/foreign.ckpt --input x --out {t}/o", "mypkg_not_installed.models.MyModule"),
    ("export", "{t}/nope.ckpt {t}/out.safetensors", "{t}/nope.ckpt"),
    ("export", "{t}/foreign.ckpt {t}/out.safetensors", "mypkg_not_installed.models.MyModule"),
    ("export", "{t}/net.safetensors {t}/out.safetensors", "net.safetensors is a safetensors weights file"),
    ("export", "{t}/vdt.ckpt {t}/out --layout diffusers", "VDTModule"),
    ("encode", "--input {t}/in --out {t}/o --ckpt {t}/nope.ckpt", "{t}/nope.ckpt"),
    ("consolidate", "{t}/nope {t}/out.ckpt", "{t}/nope"),
    ("data shards", "{t}/no-such-folder --out {t}/o", "{t}/no-such-folder"),
    ("data shards", "{t} --out {t}/o", "holds no video file"),
    ("data cityscapes", "{t} --out {t}/o --split val", "{t}/leftImg8bit_sequence/val does not exist"),
    ("data nuscenes", "{t} --out {t}/o", "{t}/v1.0-trainval/scene.json"),
    ("data opendv", "{t} --trim {t}/trims.json --out {t}/o", "{t}/trims.json"),
    ("data inspect", "{t}/nowhere", "'{t}/nowhere' matches no shard"),
    ("data motion-buckets", "{t}/nowhere --out {t}/b.json", "'{t}/nowhere' matches no shard"),
    ("data synth", "--out {t}/o --num-videos 0", "num_videos must be a positive integer"),
]


@pytest.mark.parametrize("tool, arguments, needle", MISTAKES, ids=[f"{m[0]}: {m[2]}" for m in MISTAKES])
def test_a_mistake_is_one_line_and_exit_status_2(tool, arguments, needle, files, monkeypatch, capsys):
    t = str(files)
    code, err = shell(monkeypatch, capsys, *tool.split(), *arguments.format(t=t).split())
    line = one_error_line(err, tool)
    assert code == 2
    assert needle.format(t=t) in line, line


def test_a_class_that_cannot_be_imported_says_to_put_it_on_pythonpath(files, monkeypatch, capsys):
    code, err = shell(monkeypatch, capsys, "export", files / "foreign.ckpt", files / "out.safetensors")
    line = one_error_line(err, "export")
    assert "cannot be imported (No module named 'mypkg_not_installed')" in line and "on PYTHONPATH" in line


def test_evaluate_names_every_missing_file_at_once(tmp_path, monkeypatch, capsys):
    real, generated = clip_folder(tmp_path / "real"), clip_folder(tmp_path / "generated")
    monkeypatch.delenv("VDIFF_WEIGHTS", raising=False)
    code, err = shell(monkeypatch, capsys, "evaluate", real, generated, "--fvd-weights", tmp_path / "i3d.pt")
    assert code == 2 and "i3d.pt" in one_error_line(err, "evaluate")  # a missing I3D file
    code, err = shell(monkeypatch, capsys, "evaluate", tmp_path / "nowhere", generated, "--fvd-weights",
                      tmp_path / "i3d.pt", "--fid-weights", tmp_path / "inception.pt")  # fmt: skip
    line = one_error_line(err, "evaluate")
    assert code == 2 and line.startswith("vdiff evaluate: error: 3 files are missing: ")
    for name in ("nowhere", "i3d.pt", "inception.pt", "$VDIFF_WEIGHTS is not set"):
        assert line.count(name) == 1, name


def test_encode_names_both_missing_weight_files(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("VDIFF_WEIGHTS", raising=False)
    code, err = shell(monkeypatch, capsys, "encode", "--input", tmp_path, "--out", tmp_path / "o", "--weights",
                      tmp_path / "vae.safetensors", "--image-encoder", tmp_path / "clip")  # fmt: skip
    line = one_error_line(err, "encode")
    assert code == 2 and "2 files are missing" in line and "vae.safetensors" in line and f"{tmp_path}/clip" in line


def test_debug_shows_the_traceback(files, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["vdiff", "export", str(files / "nope.ckpt"), str(files / "o.safetensors")])
    monkeypatch.setenv("VDIFF_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        main()
    monkeypatch.setattr(sys, "argv", ["vdiff", "--debug", "data", "inspect", str(files / "nowhere")])
    monkeypatch.delenv("VDIFF_DEBUG")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        main()
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("failure", ["a failing call", "a raise outside vdiff", "an AttributeError"])
def test_a_bug_keeps_its_traceback(failure, monkeypatch):
    """Only vdiff's own checks and OS errors are user errors: a ValueError from a failing call, or raised by code
    that is not vdiff's, and any other exception class, propagate."""

    def broken(args):
        if failure == "a failing call":
            return int("not a number")  # ValueError raised inside a call, not by a raise statement
        if failure == "a raise outside vdiff":
            raise ValueError("raised in a test module, not in vdiff")
        return args.no_such_option

    monkeypatch.setattr("vdiff.data.inspect.run", broken)
    monkeypatch.setattr(sys, "argv", ["vdiff", "data", "inspect", "x"])
    monkeypatch.delenv("VDIFF_DEBUG", raising=False)
    with pytest.raises((ValueError, AttributeError)):
        main()


def test_from_the_shell_and_with_vdiff_debug(tmp_path):
    """The installed `vdiff` script: one line and status 2; VDIFF_DEBUG=1 gives the traceback (status 1)."""
    vdiff = Path(sys.executable).with_name("vdiff")
    environ = {k: v for k, v in os.environ.items() if k != "VDIFF_DEBUG"}
    args = [str(vdiff), "data", "inspect", str(tmp_path / "nowhere")]
    result = subprocess.run(args, env=environ, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"vdiff data inspect: error: shard spec '{tmp_path}/nowhere' matches no shard (.tar) " \
                            "file: no such file or folder\n"  # fmt: skip
    debug = subprocess.run(args, env={**environ, "VDIFF_DEBUG": "1"}, capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1].startswith("vdiff.data.shards.NoShardsError: shard spec")


# ---------------------------------------------------------------------------------------------- fit's data paths


def video_recipe(tmp_path: Path, train: Path) -> Path:
    """The quickstart with a VideoDataModule reading ``train`` (no validation set)."""
    recipe = yaml.safe_load(QUICKSTART.read_text())
    recipe["data"] = {"class_path": "vdiff.data.datamodule.VideoDataModule",
                      "init_args": {"train": str(train), "num_frames": 10, "size": 64, "num_workers": 0}}  # fmt: skip
    recipe["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    path = tmp_path / "video.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_fit_checks_data_paths_before_training(tmp_path, monkeypatch, capsys):
    recipe = video_recipe(tmp_path, tmp_path / "data" / "train")
    code, err = shell(monkeypatch, capsys, "fit", "-c", recipe)
    assert code == 2 and "Traceback" not in err
    (missing,) = [line for line in err.splitlines() if line.startswith("vdiff fit: error: ")]
    assert missing.startswith(f"vdiff fit: error: data.init_args.train: {tmp_path}/data/train does not exist; ")
    assert f"`vdiff data shards VIDEO_FOLDER --out {tmp_path}/data --val-fraction 0.1`" in missing

    (tmp_path / "data" / "train").mkdir(parents=True)
    code, err = shell(monkeypatch, capsys, "fit", "-c", recipe)
    assert code == 2 and "Traceback" not in err
    (empty,) = [line for line in err.splitlines() if line.startswith("vdiff fit: error: ")]
    assert empty.startswith(f"vdiff fit: error: data.init_args.train: {tmp_path}/data/train holds no shards (.tar ")
    assert "`vdiff data shards VIDEO_FOLDER" in empty
    assert "GPU available" not in err  # before the Trainer (and its banner)
    assert not (tmp_path / "runs").exists()  # nothing trained or logged


def test_fit_names_every_missing_weights_file_before_building(tmp_path, monkeypatch, capsys):
    """svd_img2vid.yaml with local paths for its three weights: all three named in one line, before anything is
    built (the first loader alone used to stop at the UNet)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing reaches the network even if a hub id were left
    monkeypatch.delenv("VDIFF_WEIGHTS", raising=False)
    w = tmp_path / "weights"
    code, err = shell(monkeypatch, capsys, "fit", "-c", REPO / "recipes" / "svd_img2vid.yaml",
                      "--model.init_args.net_weights", w / "unet",
                      "--model.init_args.image_encoder.init_args.path", w / "image_encoder",
                      "--model.init_args.autoencoder.init_args.path", w / "vae",
                      "--trainer.default_root_dir", tmp_path / "runs")  # fmt: skip
    assert code == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("vdiff fit: error: ")]
    assert "3 files are missing: " in line
    for option, name in (("model.init_args.net_weights", "unet"),
                         ("model.init_args.image_encoder.init_args.path", "image_encoder"),
                         ("model.init_args.autoencoder.init_args.path", "vae")):  # fmt: skip
        assert f"{option}: {w / name}" in line
    assert "VDIFF_WEIGHTS" in line
    assert not (tmp_path / "runs").exists()


def test_recipe_weight_paths_finds_weights_keys_and_hub_ids():
    from vdiff.lit.weights_check import recipe_weight_paths

    config = {
        "model": {"class_path": "vdiff.lit.svd.SVDModule", "init_args": {
            "net_weights": "w/unet", "prior_weights": {1: 1.0}, "path": "not/a/weights/class",
            "image_encoder": {"class_path": "vdiff.weights.clip.PretrainedCLIPImageEmbedder",
                              "init_args": {"path": "w/clip"}},
            "extra": ["hf://org/repo/file.safetensors", {"fvd_weights": None}],
        }},
    }  # fmt: skip
    assert list(recipe_weight_paths(config)) == [
        ("model.init_args.net_weights", "w/unet"),
        ("model.init_args.image_encoder.init_args.path", "w/clip"),
        ("model.init_args.extra[0]", "hf://org/repo/file.safetensors"),
    ]
