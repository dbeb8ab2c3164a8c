"""`--size` means the same in every tool (H W, one number for a square, or WxH), and so does a data module's size."""

from __future__ import annotations

import argparse
import importlib

import pytest

from vdiff.data.frame_size import frame_size

# tool module -> the arguments it needs besides --size
TOOLS = {
    "vdiff.sample": ["--ckpt", "x.ckpt", "--out", "o"],
    "vdiff.encode": ["--input", "i", "--out", "o", "--ckpt", "x.ckpt"],
    "vdiff.data.convert.cityscapes": ["root", "--out", "o"],
    "vdiff.data.convert.nuscenes": ["root", "--out", "o"],
    "vdiff.data.synthetic": ["--out", "o"],
}
DEFAULTS = {"vdiff.sample": None, "vdiff.encode": None, "vdiff.data.convert.cityscapes": (128, 128),
            "vdiff.data.convert.nuscenes": None, "vdiff.data.synthetic": (64, 64)}  # fmt: skip


def parse(module: str, *size: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"vdiff {module}")
    importlib.import_module(module).add_arguments(parser)
    return parser.parse_args([*TOOLS[module], *(["--size", *size] if size else [])])


@pytest.mark.parametrize("module", sorted(TOOLS))
def test_every_tool_reads_size_the_same_way(module, capsys):
    assert parse(module).size == DEFAULTS[module]
    assert parse(module, "32").size == (32, 32)  # one number: a square
    assert parse(module, "16", "32").size == (16, 32)  # H W
    assert parse(module, "32x16").size == (16, 32)  # WxH, as image sizes are written
    for bad in (["16", "32", "48"], ["10xa"], ["0"], ["1.5"]):
        with pytest.raises(SystemExit) as exit_info:
            parse(module, *bad)
        assert exit_info.value.code == 2
        assert "error: argument --size: " in capsys.readouterr().err


def test_help_names_the_forms(capsys):
    for module in TOOLS:
        parser = argparse.ArgumentParser(prog="x")
        importlib.import_module(module).add_arguments(parser)
        parser.print_help()
        assert "H W, one number for a square, or WxH" in " ".join(capsys.readouterr().out.split()), module


def test_synth_renders_squares_only():
    from vdiff.data.synthetic import run

    with pytest.raises(ValueError, match=r"square frames: give one number, --size N \(got 16 32\)"):
        run(parse("vdiff.data.synthetic", "16", "32"))


def test_frame_size_forms():
    assert frame_size(64) == (64, 64) and frame_size((16, 32)) == (16, 32) and frame_size([8]) == (8, 8)
    assert frame_size("1024x576") == (576, 1024) and frame_size(["576", "1024"]) == (576, 1024)
    for bad in ((1, 2, 3), "ax3", 0, (4, -2), 2.5, True):
        with pytest.raises(ValueError):
            frame_size(bad)


def test_the_data_module_size_is_the_same(tmp_path):
    from vdiff.data.datamodule import VideoDataModule

    assert VideoDataModule(size=32).spec.out_hw == (32, 32)
    assert VideoDataModule(size=(16, 32)).spec.out_hw == (16, 32)
    with pytest.raises(ValueError, match=r"size must be a positive int \(a square\) or \(H, W\)"):
        VideoDataModule(size=(16, 32, 8))
