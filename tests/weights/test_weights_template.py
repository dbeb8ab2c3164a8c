"""The weights readers' one template (vdiff.weights.template, vdiff.weights.errors): one error family, configs from
any form (a .json file too), layout detection, and the strict key mapping every reader uses."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from vdiff import weights
from vdiff.models.autoencoder import AutoencoderConfig, VideoAutoencoder
from vdiff.models.unet_svd import UNetSVDConfig
from vdiff.weights import autoencoder, autoencoder_convert, clip, i3d, inflate, svd, unet_svd
from vdiff.weights.autoencoder import load_autoencoder, save_autoencoder
from vdiff.weights.errors import KeyMappingError, WeightsConfigError, WeightsError
from vdiff.weights.safetensors_io import WeightsFileError, load_state_dict, save_state_dict
from vdiff.weights.template import KeyMapper, Rule, detect_layout, map_keys, resolve_config, stacked


def test_every_reader_raises_one_family():
    """Each reader's error names are the family's classes (aliases), so one ``except WeightsError`` catches them."""
    assert autoencoder_convert.ConversionError is unet_svd.UNetSVDConversionError is clip.CLIPConversionError
    assert i3d.I3DConversionError is KeyMappingError
    assert autoencoder.AutoencoderConfigError is unet_svd.UNetSVDConfigError is clip.CLIPConfigError
    assert autoencoder.AutoencoderConfigError is WeightsConfigError
    assert inflate.InflationError is svd.SVDWeightsError is WeightsError
    for cls in (KeyMappingError, WeightsConfigError, WeightsFileError):
        assert issubclass(cls, WeightsError) and issubclass(cls, ValueError)
    assert weights.WeightsError is WeightsError  # importable from the package


def test_a_config_may_be_a_json_file(tmp_path):
    """``config=`` takes a ``.json`` file of the config's fields (what ``to_dict`` writes), as a path or a string."""
    config = AutoencoderConfig.from_name("tiny", z_channels=8)
    path = tmp_path / "ae.safetensors"
    save_autoencoder(VideoAutoencoder(config), path, layout="sgm")  # sgm files carry no config
    (tmp_path / "ae.json").write_text(json.dumps(config.to_dict()))
    assert load_autoencoder(path, config=tmp_path / "ae.json").config == config
    assert load_autoencoder(path, config=str(tmp_path / "ae.json")).config == config
    assert resolve_config(UNetSVDConfig, "tiny") == UNetSVDConfig.from_name("tiny")
    (tmp_path / "bad.json").write_text(json.dumps({"ch": 32, "bogus": 1}))
    with pytest.raises(WeightsConfigError, match=r"bad\.json: not a valid AutoencoderConfig .*bogus"):
        resolve_config(AutoencoderConfig, tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(WeightsConfigError, match=r"list\.json: a vdiff config holds a JSON object, got list"):
        resolve_config(AutoencoderConfig, str(tmp_path / "list.json"))
    with pytest.raises(TypeError, match="a .json file"):
        resolve_config(AutoencoderConfig, 3)


class _Lazy(dict):
    """A source that tells shapes without reading tensors (as a safetensors header does), counting reads."""

    def __init__(self, tensors):
        super().__init__(tensors)
        self.read: list[str] = []

    def __getitem__(self, name):
        self.read.append(name)
        return super().__getitem__(name)

    def shape(self, name):
        return tuple(dict.__getitem__(self, name).shape)


def test_strict_mapping_names_every_problem_and_reads_only_what_fits():
    source = _Lazy({"m.q": torch.ones(2, 3), "m.k": torch.zeros(2, 3), "m.bias": torch.zeros(5), "m.extra": torch.zeros(1),
                    "other.part": torch.zeros(1)})  # fmt: skip
    targets = {"qk": (4, 3), "bias": (4,), "scale": (1,)}
    names = {"qk": ["q", "k"], "bias": ["bias"], "scale": ["scale"]}
    with pytest.raises(KeyMappingError) as info:
        map_keys(source, targets, lambda k, s: stacked(names[k], s), "file.safetensors", "the model", prefix="m.")
    error = info.value
    assert str(error).startswith("file.safetensors: weights do not fit the model\n")
    assert error.missing == ["m.scale  (vdiff scale)"]
    assert error.mismatched == ["m.bias: (5,), expected (4,) (vdiff bias)"]
    assert error.unexpected == ["m.extra"]  # other.part is outside the prefix: another part of the file
    assert source.read == ["m.q", "m.k"]  # the mis-shaped tensor was never read
    assert pickle.loads(pickle.dumps(error)).args == error.args
    again = error.with_context("other.safetensors", "config from somewhere")
    assert type(again) is KeyMappingError and str(again).startswith("other.safetensors: weights do not fit the model; "
                                                                    "config from somewhere")  # fmt: skip

    source = {"a": torch.ones(2, 2, 1, 1), "b": torch.arange(3.0)}
    out = map_keys(source, {"a": (2, 2), "b": (3,)}, lambda k, s: Rule((k,), (s,), squeeze=k == "a"), "f", "the model")
    assert out["a"].shape == (2, 2) and torch.equal(out["b"], source["b"])  # a 1x1 conv read as a Linear

    mapper = KeyMapper({"x": torch.ones(2), "ids": torch.arange(3)}, "f", "the model", prefix="")
    mapper.take("one", (2,), Rule(("x",), ((2,),)))
    mapper.take("two", (2,), Rule(("x",), ((2,),)))
    mapper.expect_constant("ids", torch.arange(4), "arange(4)")
    with pytest.raises(KeyMappingError) as info:
        mapper.check(compact=True)
    text = str(info.value)
    assert "\n" not in text and "shape mismatch: ids: must be arange(4)" in text
    assert "unexpected: x (read for both one and two)" in text


def test_layout_detection_names_the_file_and_the_layouts():
    signs = (("sgm", lambda k: k.startswith("model.")), ("diffusers", lambda k: k.startswith("down_blocks.")))
    assert detect_layout(["down_blocks.0.w"], "f", signs, "UNet") == "diffusers"
    assert detect_layout(["x"], "f", signs, "UNet", {"vdiff_config": "{}"}) == "vdiff"
    with pytest.raises(WeightsError, match=r"^f: holds no UNet keys vdiff knows, so vdiff cannot tell whether it holds "
                                           r"vdiff, sgm or diffusers weights \(first keys: \['x'\]\)"):  # fmt: skip
        detect_layout(["x"], "f", signs, "UNet", {})


def test_a_sharded_checkpoint_loads_through_its_index(tmp_path):
    """``*.index.json`` (diffusers' and transformers' sharded checkpoints) reads every shard; ``select`` only some."""
    save_state_dict({"a": torch.ones(2)}, tmp_path / "part-1.safetensors")
    save_state_dict({"b": torch.zeros(3)}, tmp_path / "part-2.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "part-1.safetensors", "b": "part-2.safetensors"}}))
    assert {k: v.shape for k, v in load_state_dict(index).items()} == {"a": (2,), "b": (3,)}
    assert list(load_state_dict(index, select=lambda k: k == "b")) == ["b"]
    (tmp_path / "broken.index.json").write_text("{}")
    with pytest.raises(WeightsFileError, match=r"broken\.index\.json: not a readable shard index with a 'weight_map'"):
        load_state_dict(tmp_path / "broken.index.json")
