"""FID through clean-fid with a local Inception file: the same features as clean-fid's own loader and
"clean" resizer, the FID metric against a direct computation and clean-fid's own frechet_distance,
torchmetrics compatibility (our extractor inside torchmetrics' FrechetInceptionDistance), the torchmetrics
backend, and the missing-weights error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from vdiff.callbacks.video_quality import build_fid
from vdiff.metrics.fid import CleanFIDInception, FIDProtocol
from vdiff.metrics.frechet import FrechetStats, to_uint8
from vdiff.weights.i3d import find_feature_weights, load_torchscript
from vdiff.weights.safetensors_io import file_sha256

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated", "ignore:`torch.jit.load` is deprecated"
)


class StubInceptionLayers(torch.nn.Module):
    """Stands in for the ``layers`` of clean-fid's TorchScript Inception: (N, 3, 299, 299) -> (N, 2048, 1, 1)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(3 * 4 * 4, 2048, generator=g) / 7, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.size(2) != 299 or x.size(3) != 299:
            raise RuntimeError("stub Inception layers: expects 299x299")
        return (F.adaptive_avg_pool2d(x, [4, 4]).flatten(1) @ self.proj).view(x.size(0), 2048, 1, 1)


class StubInception(torch.nn.Module):
    """A TorchScript stand-in for ``inception-2015-12-05.pt`` with the attributes clean-fid uses."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = StubInceptionLayers()

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor:
        return self.layers((x.float() - 128.0) / 128.0).flatten(1)


def write_stub_inception(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(StubInception()).save(str(path))
    return path


def frames(n: int, seed: int, size: int = 20, shift: float = 0.0) -> Tensor:
    """uint8 images ``(n, 3, size, size)`` with smooth random content."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(
        torch.rand(n, 3, 5, 5, generator=g) * 2 - 1, size=(size, size), mode="bilinear", align_corners=False
    )
    return to_uint8((x + shift).clamp(-1, 1))


def test_features_equal_clean_fids_own_loader_and_resizer(tmp_path):
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    path = write_stub_inception(tmp_path / "inception-2015-12-05.pt")
    ours = CleanFIDInception(load_torchscript(path, "clean_fid"))
    images = frames(5, seed=0)
    # clean-fid itself: its loader (download=False: the file is in the folder) and its "clean" resizer.
    theirs = InceptionV3W(str(tmp_path), download=False)
    resize = build_resizer("clean")
    batch = torch.stack([torch.from_numpy(resize(img)).permute(2, 0, 1) for img in images.permute(0, 2, 3, 1).numpy()])
    torch.testing.assert_close(ours(images), theirs(batch), rtol=0, atol=0)
    assert ours(images).shape == (5, 2048) and ours.num_features == 2048
    with pytest.raises(TypeError, match="uint8"):
        ours(images.float())


def fid_setup(tmp_path):
    path = write_stub_inception(tmp_path / "w" / "inception-2015-12-05.pt")
    real = frames(12, seed=1).unflatten(0, (4, 3))  # video (B, T, 3, H, W): 4 clips of 3 frames
    fake = frames(9, seed=2, shift=0.3).unflatten(0, (3, 3))
    return path, real, fake


def test_fid_metric_states_are_the_features_float64_sums(tmp_path):
    path, real, fake = fid_setup(tmp_path)
    metric = build_fid(path, FIDProtocol(frames="all"))
    assert metric.protocol.weights_sha256 == file_sha256(path) and metric.protocol.cov_divisor == "N-1"
    metric.update(real[:3], real=True)  # two batches of clips, frames folded into images
    metric.update(real[3:], real=True)
    metric.update(fake, real=False)
    assert metric.counts() == {"real": 12, "generated": 9}
    extractor = CleanFIDInception(load_torchscript(path, "clean_fid"))
    for side, parts in ((True, [real[:3], real[3:]]), (False, [fake])):  # the same calls: bit-equal float32 features
        expected = FrechetStats.of(torch.cat([extractor(video.flatten(0, 1)) for video in parts]).double())
        got = metric.stats(real=side)
        assert got.count == expected.count
        torch.testing.assert_close(got.total, expected.total, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.outer, expected.outer, rtol=1e-12, atol=1e-12)
    value = float(metric.compute())  # 2048 features: the one eigh of this test
    assert np.isfinite(value) and value > 0
    text = metric.protocol.describe()
    assert "clean-fid 'clean'" in text and "covariance / N-1" in text and file_sha256(path)[:16] in text


def test_extractor_works_inside_torchmetrics_fid(tmp_path):
    """torchmetrics' FrechetInceptionDistance accepts the clean-fid extractor and keeps the same float64 sums."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    path, real, fake = fid_setup(tmp_path)
    tm = FrechetInceptionDistance(feature=CleanFIDInception(load_torchscript(path, "clean_fid")))
    tm.update(real.flatten(0, 1), real=True)
    tm.update(fake.flatten(0, 1), real=False)
    ours = build_fid(path, FIDProtocol(frames="all"))
    ours.update(real, real=True)
    ours.update(fake, real=False)
    assert int(tm.real_features_num_samples) == 12 and int(tm.fake_features_num_samples) == 9
    torch.testing.assert_close(tm.real_features_sum, ours.real_total, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tm.fake_features_cov_sum, ours.fake_outer, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_fid_value_equals_clean_fid_and_torchmetrics(tmp_path):
    """The number itself against clean-fid's frechet_distance (scipy sqrtm) and torchmetrics' compute (eigvals)."""
    from cleanfid.fid import frechet_distance as clean_fid_distance
    from torchmetrics.image.fid import FrechetInceptionDistance

    path, real, fake = fid_setup(tmp_path)
    ours = build_fid(path, FIDProtocol(frames="all"))
    ours.update(real, real=True)
    ours.update(fake, real=False)
    value = float(ours.compute())
    extractor = CleanFIDInception(load_torchscript(path, "clean_fid"))
    a, b = extractor(real.flatten(0, 1)).double().numpy(), extractor(fake.flatten(0, 1)).double().numpy()
    reference = clean_fid_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert abs(value - reference) < 1e-6 * reference
    tm = FrechetInceptionDistance(feature=extractor)
    tm.update(real.flatten(0, 1), real=True)
    tm.update(fake.flatten(0, 1), real=False)
    assert abs(float(tm.compute()) - value) < 1e-4 * value  # torchmetrics returns the features' float32


def test_torchmetrics_backend_and_missing_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VDIFF_WEIGHTS", raising=False)
    monkeypatch.setenv("VDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the default name is downloadable: offline, the error says from where
    with pytest.raises(FileNotFoundError) as err:
        find_feature_weights("clean_fid")
    cached = tmp_path / "cache" / "weights" / "inception-2015-12-05.pt"
    assert str(err.value) == (
        f"FID Inception (clean-fid's TorchScript Inception) not found: inception-2015-12-05.pt or {cached} "
        f"($VDIFF_WEIGHTS is not set). inception-2015-12-05.pt is not in {cached.parent} and downloads are off "
        "(HF_HUB_OFFLINE=1): put the file there by hand (https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/"
        f"pretrained/metrics/inception-2015-12-05.pt saved as {cached}), or run `vdiff weights download "
        "clean-fid-inception` where there is network."
    )
    with pytest.raises(FileNotFoundError, match=r"weights-inception-2015-12-05-6726825d\.pth"):
        build_fid(None, FIDProtocol(backend="torchmetrics"))
    file = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    file.write_bytes(b"not read without torch-fidelity")
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        with pytest.raises(ModuleNotFoundError, match="torch-fidelity"):
            build_fid(file, FIDProtocol(backend="torchmetrics"))
