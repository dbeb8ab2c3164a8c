"""FVD: end to end through the TorchScript path with a scripted stub of StyleGAN-V's I3D (called with its
kwargs, on uint8 clips), vdiff's I3D (shape, the 9-frame minimum, strict weight conversion from the PyTorch
ports' layouts, the vdiff-weights path), the pinned protocol, missing-weights errors and the real-statistics
cache keys."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from vdiff.callbacks.video_quality import build_fvd
from vdiff.metrics.frechet import FrechetStats, StatsCache, stats_key, to_uint8
from vdiff.metrics.fvd import FVDProtocol, I3DFeatures
from vdiff.models.i3d import I3D
from vdiff.weights.i3d import (
    I3DConversionError,
    convert_i3d_state_dict,
    find_feature_weights,
    i3d_source_key,
    load_fvd_network,
    load_i3d,
)
from vdiff.weights.safetensors_io import file_sha256

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated", "ignore:`torch.jit.load` is deprecated"
)


class StubI3D(torch.nn.Module):
    """A TorchScript stand-in for StyleGAN-V's ``i3d_torchscript.pt``: the same call and 400 features.

    It refuses anything but what StyleGAN-V passes (uint8 ``(B, 3, T, H, W)``, rescale/resize/return_features
    all true), so a test through it proves the call."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(3 * 3 * 2 * 2, 400, generator=g) / 6, requires_grad=False)

    def forward(self, x: Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False) -> Tensor:
        if x.dtype != torch.uint8:
            raise RuntimeError("stub I3D: expects uint8 clips")
        if not (rescale and resize and return_features):
            raise RuntimeError("stub I3D: expects rescale=True, resize=True, return_features=True")
        if x.dim() != 5 or x.size(1) != 3:
            raise RuntimeError("stub I3D: expects (B, 3, T, H, W)")
        v = x.float() / 127.5 - 1.0
        v = F.adaptive_avg_pool3d(v, [3, 2, 2])
        return v.flatten(1) @ self.proj


def write_stub_i3d(path: Path) -> Path:
    torch.jit.script(StubI3D()).save(str(path))
    return path


def smooth_clips(n: int, frames: int = 10, size: int = 16, seed: int = 0, shift: float = 0.0) -> Tensor:
    """``(n, T, 3, size, size)`` in [-1, 1]: per-clip random blobs drifting over time (+ ``shift``)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, 3, 4, 4, generator=g) * 2 - 1
    drift = torch.linspace(0, 1, frames).view(1, frames, 1, 1, 1) * (torch.rand(n, 1, 3, 1, 1, generator=g) - 0.5)
    video = F.interpolate((base + drift).flatten(0, 1), size=(size, size), mode="bilinear", align_corners=False)
    return (video.unflatten(0, (n, frames)) + shift).clamp(-1, 1)


# ------------------------------------------------------------------------------------------------ TorchScript path


def test_fvd_end_to_end_through_the_torchscript_path(tmp_path):
    path = write_stub_i3d(tmp_path / "i3d_torchscript.pt")
    backend, network = load_fvd_network(path)
    assert backend == "i3d_torchscript" and network.weights_sha256 == file_sha256(path)
    metric = build_fvd(path, FVDProtocol(num_frames=9, num_real=12, num_generated=7))
    assert metric.protocol.weights == "i3d_torchscript.pt" and metric.protocol.weights_sha256 == file_sha256(path)
    assert metric.protocol.backend == "i3d_torchscript" and metric.protocol.resize_method == "torchscript"
    real, fake = smooth_clips(12, seed=1), smooth_clips(7, seed=2, shift=0.2)
    for part in real.split(5):  # uneven batches
        metric.update(part, real=True)
    for part in fake.split(3):
        metric.update(part, real=False)
    value = float(metric.compute())
    assert metric.counts() == {"real": 12, "generated": 7}

    # The same number by hand: StyleGAN-V's call on uint8 (B, 3, T, H, W) clips of the first 9 frames.
    stub = torch.jit.load(str(path))

    def features(video: Tensor) -> Tensor:
        return stub(to_uint8(video[:, :9]).permute(0, 2, 1, 3, 4), rescale=True, resize=True, return_features=True)

    real_features = torch.cat([features(part) for part in real.split(5)])  # the same batches: bit-equal features
    fake_features = torch.cat([features(part) for part in fake.split(3)])
    expected = FrechetStats.of(real_features).distance(FrechetStats.of(fake_features), "N")
    # Rank-11 covariances of 400 features: the summation order (batches vs one pass) moves the result by ~1e-9.
    assert abs(value - expected) < 1e-8 * expected and value > 0
    # Real against itself is 0; the protocol is printed with the file's hash and the call.
    same = build_fvd(path, FVDProtocol(num_frames=9))
    same.update(real, real=True)
    same.update(real, real=False)
    assert abs(float(same.compute())) < 1e-8
    text = metric.protocol.describe()
    assert "rescale=True, resize=True, return_features=True" in text and file_sha256(path)[:16] in text
    assert "N real 12 / generated 7" in text and "covariance / N" in text


def test_protocol_refuses_fewer_than_9_frames_and_short_clips(tmp_path):
    with pytest.raises(ValueError, match="at least 9 frames"):
        FVDProtocol(num_frames=8)
    metric = build_fvd(write_stub_i3d(tmp_path / "i3d.pt"), FVDProtocol(num_frames=16))
    with pytest.raises(ValueError, match="clips have 10 frames but the protocol needs 16"):
        metric.update(smooth_clips(2), real=True)
    assert FVDProtocol.preset("tats").cov_divisor == "N-1" and FVDProtocol.preset("stylegan-v").cov_divisor == "N"
    assert FVDProtocol.from_dict(FVDProtocol().to_dict()) == FVDProtocol()


# ------------------------------------------------------------------------------------------------ vdiff's I3D


def test_vdiff_i3d_gives_400_logits_and_refuses_8_frames():
    torch.manual_seed(0)
    model = I3D().eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 9, 224, 224) * 2 - 1)
    assert out.shape == (2, 400) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="I3D needs at least 9 frames per clip, got 8"):
        model(torch.zeros(1, 3, 8, 224, 224))
    with pytest.raises(ValueError, match="224x224"):
        model(torch.zeros(1, 3, 9, 112, 112))


def _peer_state(model: I3D, layout: str) -> dict[str, Tensor]:
    """``model``'s weights as a PyTorch port would store them (old files have no num_batches_tracked)."""
    return {
        i3d_source_key(k, layout): v.clone()
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }


@pytest.mark.parametrize("layout", ["pytorch_i3d", "kinetics_i3d_pytorch"])
def test_converter_maps_peer_layouts_strictly(tmp_path, layout):
    torch.manual_seed(1)
    model = I3D()
    state = _peer_state(model, layout)
    assert ("Conv3d_1a_7x7.conv3d.weight" if layout == "pytorch_i3d" else "conv3d_1a_7x7.conv3d.weight") in state
    converted = convert_i3d_state_dict(state)
    for key, value in model.state_dict().items():
        assert torch.equal(converted[key], value if not key.endswith("num_batches_tracked") else torch.tensor(0))
    file = tmp_path / f"{layout}.pt"
    torch.save(state, file)
    loaded = load_i3d(file)
    assert loaded.weights_layout == layout and loaded.weights_sha256 == file_sha256(file) and not loaded.training
    assert torch.equal(loaded.mixed_4c.branch2b.conv.weight, model.mixed_4c.branch2b.conv.weight)

    broken = dict(state)
    first = next(k for k in broken if "Mixed" in k or "mixed" in k)
    del broken[first]
    conv = i3d_source_key("conv2b.conv.weight", layout)
    broken[conv] = broken[conv][:32]
    broken["extra.weight"] = torch.zeros(1)
    with pytest.raises(I3DConversionError) as err:
        convert_i3d_state_dict(broken, file="broken.pt")
    text = str(err.value)
    assert text.startswith(f"broken.pt: {layout} I3D weights do not fit")
    assert (
        f"missing: {first}" in text
        and f"shape mismatch: {conv} (32, 64, 1, 1, 1)" in text
        and "unexpected: extra.weight" in text
    )


def test_vdiff_i3d_path_through_converted_weights(tmp_path):
    torch.manual_seed(2)
    source = tmp_path / "rgb_imagenet.pt"
    torch.save(_peer_state(I3D(), "pytorch_i3d"), source)
    from vdiff.weights.i3d import convert_i3d_file

    out = convert_i3d_file(source, tmp_path / "i3d_kinetics400.safetensors")
    backend, network = load_fvd_network(out)
    assert backend == "vdiff_i3d" and isinstance(network, I3D)
    metric = build_fvd(out, FVDProtocol(num_frames=9, resize_method="torchscript"))
    assert metric.protocol.backend == "vdiff_i3d" and metric.protocol.resize_method == "trilinear"
    assert isinstance(metric.network, I3DFeatures)
    real, fake = smooth_clips(2, seed=3), smooth_clips(2, seed=4)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    assert metric.counts() == {"real": 2, "generated": 2} and np.isfinite(float(metric.compute()))
    # The preprocessing: uint8 -> trilinear to 224 -> [-1, 1], as the TorchScript does inside.
    clips = to_uint8(real[:1, :9]).permute(0, 2, 1, 3, 4)
    x = metric.network.preprocess(clips)
    assert x.shape == (1, 3, 9, 224, 224) and float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    resized = F.interpolate(clips.float(), size=(9, 224, 224), mode="trilinear", align_corners=False) / 127.5 - 1
    torch.testing.assert_close(x, resized)


# ------------------------------------------------------------------------------------------------ weights, cache


def test_missing_weights_error_names_file_variable_and_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VDIFF_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("VDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the default name is downloadable: offline, the error says from where
    with pytest.raises(FileNotFoundError) as err:
        find_feature_weights("i3d_torchscript")
    cached = tmp_path / "cache" / "weights" / "i3d_torchscript.pt"
    assert str(err.value) == (
        f"FVD I3D (StyleGAN-V's TorchScript Kinetics-400 I3D) not found: i3d_torchscript.pt or "
        f"{tmp_path}/weights/i3d_torchscript.pt or {cached} ($VDIFF_WEIGHTS={tmp_path}/weights). i3d_torchscript.pt "
        f"is not in {cached.parent} and downloads are off (HF_HUB_OFFLINE=1): put the file there by hand "
        f"(https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1 saved as {cached}), or run "
        "`vdiff weights download i3d-torchscript` where there is network."
    )
    monkeypatch.delenv("VDIFF_WEIGHTS")
    with pytest.raises(FileNotFoundError) as err:
        build_fvd("nowhere/i3d.pt")
    assert str(err.value) == (
        "FVD I3D (StyleGAN-V's TorchScript Kinetics-400 I3D) not found: nowhere/i3d.pt ($VDIFF_WEIGHTS is not set). "
        "Copy the file there, pass an absolute path or a hub id (hf://ORG/NAME/FILE), or set VDIFF_WEIGHTS to the "
        "directory that holds it. The file is https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1 "
        "(`vdiff weights download i3d-torchscript`)."
    )
    # Found under $VDIFF_WEIGHTS by its default name.
    (tmp_path / "weights").mkdir()
    write_stub_i3d(tmp_path / "weights" / "i3d_torchscript.pt")
    monkeypatch.setenv("VDIFF_WEIGHTS", str(tmp_path / "weights"))
    assert build_fvd(None).protocol.weights == "i3d_torchscript.pt"


def test_real_statistics_cache_is_reused_and_keyed_by_protocol(tmp_path):
    path = write_stub_i3d(tmp_path / "i3d.pt")
    cache = StatsCache(tmp_path / "cache")
    calls = {"computed": 0}

    def real_stats(protocol: FVDProtocol) -> tuple[FrechetStats, str]:
        metric = build_fvd(path, protocol)
        key = stats_key(metric.protocol.real_stats_fields(), "smooth_clips(6, seed=5)")
        cached = cache.load("fvd", key)
        if cached is not None:
            return cached, "read"
        calls["computed"] += 1
        metric.update(smooth_clips(6, seed=5), real=True)
        stats = metric.stats(real=True)
        cache.save("fvd", key, stats, {"protocol": metric.protocol.to_dict()})
        return stats, "computed"

    first, how = real_stats(FVDProtocol(num_frames=9))
    assert how == "computed" and first.count == 6
    again, how = real_stats(FVDProtocol(num_frames=9))
    assert how == "read" and torch.equal(again.outer, first.outer) and calls["computed"] == 1
    _, how = real_stats(FVDProtocol(num_frames=10))  # another protocol: other statistics
    assert how == "computed" and calls["computed"] == 2
    _, how = real_stats(
        FVDProtocol(num_frames=9, cov_divisor="N-1", num_generated=99)
    )  # raw sums do not depend on these
    assert how == "read" and len(list((tmp_path / "cache").iterdir())) == 2
