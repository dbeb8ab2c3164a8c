"""`vdiff sample --rounds N` on a Vista checkpoint (recipes/vista.yaml, a tiny UNet trained 1 step on 25-frame
synthetic clips): the rollout mp4 has 25 + 22 (N - 1) frames; actions come from a JSON file (one entry per round
or one for every round) or from the shards; a file of the wrong length is refused naming it; --uncertainty prints
Vista's reward."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.lit.helpers import quiet_trainer, tiny_synthetic_data
from vdiff.cli import main
from vdiff.data.video_io import decode_all, probe
from vdiff.lit.vista import VistaModule, recorded_round_actions, rollout_length
from vdiff.sample import _run_vista, add_arguments, load_actions_file

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers", "ignore:The number of training batches", "ignore:.*LeafSpec.*"
)
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "vista.yaml"
T = 25
TINY_NET = {"in_channels": 6, "out_channels": 3, "concat_channels": 3, "model_channels": 32, "channel_mult": [1, 2],
            "num_res_blocks": 1, "attention_levels": [1], "head_dim": 16, "context_dim": 24,
            "added_time_embed_dim": 32, "num_frames": T}  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny pixel-space Vista checkpoint trained 1 step on 25-frame 16x16 synthetic clips, and its val shards."""
    root = tmp_path_factory.mktemp("sample-rollout")
    cache = root / "cache"
    main([
        "fit", "-c", str(RECIPE),
        "--model.init_args.net", json.dumps(TINY_NET), "--model.init_args.net_weights", "null",
        "--model.init_args.autoencoder", "null",
        "--model.init_args.image_encoder", json.dumps({"class_path": "vdiff.models.conditioners.CLIPImageEmbedder",
                                                       "init_args": {"config": "tiny"}}),
        "--model.init_args.sampler.steps", "1",
        "--data.class_path", "vdiff.data.synthetic_datamodule.SyntheticDrivingDataModule",
        *tiny_synthetic_data(cache, frames=T), "--data.init_args.size", "16", "--data.init_args.video_size", "16",
        "--data.init_args.batch_size", "1",
        *quiet_trainer(root / "runs", steps=1), "--trainer.limit_val_batches", "0",
        "--trainer.precision", "32-true", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.strategy", "auto", "--trainer.accumulate_grad_batches", "1",
    ])  # fmt: skip
    (checkpoint,) = (root / "runs").rglob("last.ckpt")
    (val,) = cache.glob("synthetic-drive-*/val")
    return checkpoint, val


def sample(checkpoint: Path, out: Path, *options: str) -> int:
    return main(["sample", "--ckpt", str(checkpoint), "--out", str(out), "--steps", "1", "--seed", "3", *options])


@pytest.mark.parametrize("rounds", [1, 3])
def test_rollout_writes_25_plus_22_frames_per_extra_round(trained, tmp_path, rounds):
    checkpoint, val = trained
    actions = tmp_path / "left.json"
    actions.write_text(json.dumps({"speed": 8.0, "steering": 90.0, "command": 0}))  # one entry for every round
    out = tmp_path / "out"
    assert sample(checkpoint, out, "--input", str(val), "--num-videos", "1", "--rounds", str(rounds),
                  "--overlap", "3", "--triangle-guidance", "1", "2.5", "--actions", str(actions),
                  "--decode-chunk", "10", "--decode-overlap", "2") == 0  # fmt: skip
    settings = json.loads((out / "samples.json").read_text())
    (key,) = settings["keys"]
    mp4 = out / f"{key}-sample.mp4"
    frames = decode_all(mp4)
    assert frames.shape == (T + 22 * (rounds - 1), 16, 16, 3) == (rollout_length(T, rounds, 3), 16, 16, 3)
    assert probe(mp4).fps == pytest.approx(10.0)
    assert settings["frames"] == frames.shape[0] and settings["rounds"] == rounds and settings["overlap"] == 3
    assert settings["given_frames"] == 3 and settings["actions"] == f"file {actions}"
    assert settings["guidance"].startswith("TriangleCFG(min_scale=1.0, max_scale=2.5")
    assert settings["decode_chunk"] == 10 and settings["decode_overlap"] == 2
    assert (out / "grid.png").is_file()


def test_rollout_reads_the_recorded_actions_and_prints_the_uncertainty(trained, tmp_path, capsys):
    checkpoint, val = trained
    out = tmp_path / "out"
    assert sample(checkpoint, out, "--input", str(val), "--num-videos", "2", "--rounds", "2", "--given-frames", "1",
                  "--uncertainty", "2") == 0  # fmt: skip
    settings = json.loads((out / "samples.json").read_text())
    assert settings["actions"] == "recorded in the input shards" and settings["given_frames"] == 1
    assert all(decode_all(out / f"{key}-sample.mp4").shape[0] == T + 22 for key in settings["keys"])
    printed = capsys.readouterr().out
    assert "Vista uncertainty: variance over an ensemble of 2 samples" in printed
    values = settings["uncertainty"]["values"]
    assert set(values) == set(settings["keys"]) and all(v > 0 for v in values.values())
    for key, value in values.items():
        assert f"  {key}: uncertainty {value:.6g}" in printed
        assert settings["uncertainty"]["reward"][key] == pytest.approx(np.exp(-value * (T - 1) / T))


def test_uncertainty_alone_samples_no_video(trained, tmp_path, capsys):
    checkpoint, val = trained
    out = tmp_path / "out"
    assert sample(checkpoint, out, "--input", str(val), "--num-videos", "1", "--uncertainty", "2") == 0
    assert not list(out.glob("*.mp4")) and "uncertainty" in json.loads((out / "samples.json").read_text())
    assert "reward" in capsys.readouterr().out


def test_an_actions_file_of_the_wrong_length_is_refused(trained, tmp_path):
    checkpoint, val = trained
    actions = tmp_path / "two.json"
    actions.write_text(json.dumps([{"speed": 5.0}, {"speed": 6.0}]))
    out = tmp_path / "out"
    with pytest.raises(ValueError) as error:
        sample(checkpoint, out, "--input", str(val), "--num-videos", "1", "--rounds", "3", "--actions", str(actions))
    assert str(error.value) == (
        f"vdiff sample: actions file {actions} holds 2 round(s) of actions but --rounds is 3: give one entry per round, "
        "or a single dict (not in a list) used for every round"
    )
    assert not list(out.glob("*.mp4"))
    short = tmp_path / "short.json"
    short.write_text(json.dumps({"speed": [5.0, 6.0, 7.0]}))
    with pytest.raises(ValueError, match=rf"actions file {short}, round 0: action 'speed' must be one value of shape "
                                         rf"\(\) for every frame, or a list of {T} per-frame values"):  # fmt: skip
        sample(checkpoint, out, "--input", str(val), "--num-videos", "1", "--rounds", "2", "--actions", str(short))


def test_actions_file_forms():
    every = load_actions_file_from({"speed": 3.0, "trajectory": [[1, 0], [2, 0], [3, 0], [4, 0]]}, rounds=2, window=4)
    assert len(every) == 2 and every[0]["speed"].tolist() == [3.0] * 4 and every[1]["speed_valid"].all()
    assert every[0]["trajectory"].shape == (4, 4, 2) and not every[0]["goal_valid"].any()
    per_round = load_actions_file_from([{"speed": [1, None, 3, 4]}, [{"command": 2}, {}, None, {"command": 1}]], 2, 4)
    assert per_round[0]["speed_valid"].tolist() == [True, False, True, True]
    assert per_round[1]["command"].tolist() == [2, 0, 0, 1] and per_round[1]["command_valid"].tolist() == [
        True, False, False, True]  # fmt: skip
    with pytest.raises(ValueError, match=r"unknown action\(s\) \['throttle'\]"):
        load_actions_file_from({"throttle": 1.0}, 1, 4)
    with pytest.raises(ValueError, match="is not one of 0..3"):
        load_actions_file_from({"command": 7}, 1, 4)
    with pytest.raises(ValueError, match="4 per-frame action dicts"):
        load_actions_file_from([[{"speed": 1.0}]], 1, 4)
    recorded = recorded_round_actions({"speed": [1.0, 2.0, 3.0, 4.0, 5.0]}, start=3, window=4)  # past the recording
    assert recorded["speed"].tolist() == [4.0, 5.0, 0.0, 0.0] and recorded["speed_valid"].tolist() == [
        True, True, False, False]  # fmt: skip


DEEP = 200_000  # levels
BAD_ACTIONS_FILES = {  # name -> (file contents, None for a folder; what the one-line message says)
    "nested": (b"[" * DEEP + b"]" * DEEP, "is nested too deeply to parse"),
    "folder": (None, "cannot read actions file .*: Is a directory"),
    "not_utf8": (b'{"speed": "\xff\xfe"}', "is not valid json: 'utf-8' codec can't decode"),
    "nan": (b'{"speed": NaN}', "NaN is not a number; write null for an unknown value"),
    "infinity": (b'{"speed": [1, 2, Infinity, 4]}', "Infinity is not a number"),
    "minus_infinity": (b'[{"steering": -Infinity}]', "-Infinity is not a number"),
    "beyond_float32": (b'{"speed": 1e39}', r"1e39 is out of range \(the largest magnitude is 3.402823e\+38\)"),
    "beyond_float64": (b'{"speed": 1e400}', "1e400 is out of range"),
    "integer_beyond_float32": (b'{"speed": 1' + b"0" * 39 + b"}", "beyond float32's range"),
}


@pytest.mark.parametrize("name", sorted(BAD_ACTIONS_FILES))
def test_a_bad_actions_file_is_refused_in_one_line_naming_it(name, tmp_path):
    """Not silently dropped (NaN/Infinity once gave an unconditioned rollout and exit 0), not turned into inf
    (1e39 in float32), and no RecursionError/IsADirectoryError/UnicodeDecodeError."""
    contents, message = BAD_ACTIONS_FILES[name]
    path = tmp_path / f"{name}.json"
    if contents is None:
        path.mkdir()
    else:
        path.write_bytes(contents)
    with pytest.raises(ValueError, match=message) as error:
        load_actions_file(path, rounds=1, window=4)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert str(error.value).startswith("vdiff sample: ")


def load_actions_file_from(data, rounds: int, window: int, _counter=[0]):  # noqa: B006 (a file per call)
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"actions{_counter[0]}.json"
        _counter[0] += 1
        path.write_text(json.dumps(data))
        return load_actions_file(path, rounds, window)


def test_other_checkpoints_and_bad_options_are_refused(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--ckpt", "x.ckpt", "--out", str(tmp_path), "--input", "v.mp4", "--rounds", "2"])
    with pytest.raises(ValueError, match=r"need a Vista checkpoint \(VistaModule\); x.ckpt holds a Module"):
        _run_vista(args, torch.nn.Module(), Path("x.ckpt"), T, (16, 16))
    assert float(VistaModule.reward(torch.tensor([0.5]), 25, 1)) == pytest.approx(np.exp(-0.5 * 24 / 25))
