"""VideoQuality in a real Lightning fit: PSNR/SSIM/LPIPS/FVD/FID reach TensorBoard's event file, the sample is
the module's own validation sample (same seed, EMA weights), the protocol lands in the checkpoint and the
printed report; real statistics are cached on disk and read back by a second run, keyed by the protocol;
missing weights fail at setup."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torchvision
from lightning.pytorch.loggers import TensorBoardLogger

from tests.lit.helpers import vdt_module
from tests.lit.test_vdt_module import moving_square_batch
from tests.metrics.test_fid import write_stub_inception
from tests.metrics.test_fvd import write_stub_i3d
from vdiff.callbacks.ema import EMA
from vdiff.callbacks.video_quality import QUALITY_KEY, VideoQuality, select_frames
from vdiff.lit.evaluation import EvalProtocol
from vdiff.metrics.fvd import FVD, FVDProtocol
from vdiff.metrics.lpips import lpips_backbone_path
from vdiff.weights.safetensors_io import file_sha256

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated",
    "ignore:.*does not have many workers",
    "ignore:The number of training batches",
)
FRAMES, SIZE = 10, 32  # 1 given + 9 generated frames: I3D's minimum


@pytest.fixture
def weights(tmp_path, monkeypatch):
    """Stub I3D and Inception TorchScript files, and a random SqueezeNet backbone for LPIPS under TORCH_HOME."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    backbone = lpips_backbone_path("squeeze")
    backbone.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.squeezenet1_1().state_dict(), backbone)
    fid = write_stub_inception(tmp_path / "weights" / "inception-2015-12-05.pt")
    return SimpleNamespace(fvd=write_stub_i3d(tmp_path / "weights" / "i3d_torchscript.pt"), fid=fid)


class Clips(torch.utils.data.IterableDataset):
    def __iter__(self):
        for seed in range(1000):
            batch = moving_square_batch(batch=2, frames=FRAMES, size=SIZE, seed=seed)
            yield {"video": batch["video"], "key": batch["key"]}


def val_loader():
    batches = [moving_square_batch(batch=2, frames=FRAMES, size=SIZE, seed=100 + i) for i in range(2)]
    return torch.utils.data.DataLoader(batches, batch_size=None)


def tiny_module():
    return vdt_module(patch_size=8, depth=1, hidden_size=32, num_heads=2, learn_sigma=False, prediction="x0",
                      val_steps=2, val_given_frames=1, configure=False, mask_weights={"prediction": 1.0}, lr=1e-2)  # fmt: skip


def quality(weights, tmp_path, **kwargs) -> VideoQuality:
    options = dict(fvd_weights=str(weights.fvd), fid_weights=str(weights.fid), lpips="squeeze",
                   fvd=FVDProtocol(num_frames=9), stats_cache=str(tmp_path / "stats"), real_data_id="two moving-square batches")  # fmt: skip
    options.update(kwargs)
    return VideoQuality(**options)


def test_fit_logs_quality_metrics_to_tensorboard_and_stores_the_protocol(weights, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callback = quality(weights, tmp_path)
    logger = TensorBoardLogger(str(tmp_path / "runs"), name="vq")
    trainer = L.Trainer(
        max_steps=2, val_check_interval=2, limit_val_batches=2, num_sanity_val_steps=1, accelerator="cpu",
        logger=logger, callbacks=[EMA(decay=0.5), callback], enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(tiny_module(), train_dataloaders=torch.utils.data.DataLoader(Clips(), batch_size=None),
                val_dataloaders=val_loader())  # fmt: skip

    # One validation after step 2 (the sanity check is skipped): 4 clips, 9 generated frames each.
    results = callback.results
    assert results["clips"] == 4 and results["fvd_real"] == 4 and results["fvd_generated"] == 4
    assert results["fid_real"] == 36 and results["fid_generated"] == 36
    events = list(Path(logger.log_dir).glob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(logger.log_dir))
    accumulator.Reload()
    scalars = set(accumulator.Tags()["scalars"])
    for name in ("psnr", "ssim", "lpips", "fvd", "fid"):
        tag = f"val/quality/{name}"
        assert tag in scalars, f"{tag} not in {sorted(scalars)}"
        (event,) = accumulator.Scalars(tag)
        assert math.isfinite(event.value) and event.step == accumulator.Scalars("val/psnr")[0].step
        assert abs(event.value - results[name]) <= 1e-4 * max(1.0, abs(results[name]))
    # The callback scores the module's own validation sample: same seed, same (EMA) weights.
    (module_psnr,) = accumulator.Scalars("val/psnr")
    assert abs(module_psnr.value - results["psnr"]) < 1e-3

    checkpoint = torch.load(trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path,
                            map_location="cpu", weights_only=False)  # fmt: skip
    stored = checkpoint[QUALITY_KEY]
    assert stored["fvd"]["weights_sha256"] == file_sha256(weights.fvd) and stored["fvd"]["num_frames"] == 9
    assert stored["fvd"]["frames"] == "generated" and stored["fid"]["weights_sha256"] == file_sha256(weights.fid)
    assert stored["evaluation"]["given_frames"] == 1 and stored["results"]["fvd"] == results["fvd"]
    assert FVDProtocol.from_dict(stored["fvd"]).describe() == callback.fvd_protocol.describe()

    printed = capsys.readouterr().out
    assert "Video quality on validation clips (epoch 0, step 2) (4 clips)" in printed
    assert callback.fvd_protocol.describe() in printed and callback.fid_protocol.describe() in printed
    assert "FVD real statistics: computed, saved to" in printed
    for row in ("PSNR (dB)", "SSIM", "LPIPS (squeeze)", "FVD", "FID"):
        assert any(line.startswith(row) for line in printed.splitlines()), row


def test_second_run_reads_cached_real_statistics_and_another_protocol_misses(weights, tmp_path, monkeypatch):
    real_updates = []
    original = FVD.update
    monkeypatch.setattr(
        FVD, "update", lambda self, video, real: (real_updates.append(real), original(self, video, real))
    )

    def validate(callback: VideoQuality) -> VideoQuality:
        trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[callback], enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
        module = tiny_module()
        module.configure_model()
        trainer.validate(module, dataloaders=val_loader(), verbose=False)
        return callback

    first = validate(quality(weights, tmp_path, print_report=False, fid_weights=None, lpips=None))
    assert first.real_source["fvd"].startswith("computed, saved to") and real_updates.count(True) == 2
    real_updates.clear()
    second = validate(quality(weights, tmp_path, print_report=False, fid_weights=None, lpips=None))
    assert second.real_source["fvd"] == first.real_source["fvd"].replace("computed, saved to", "read from")
    assert real_updates.count(True) == 0 and real_updates.count(False) == 2  # no real clip through I3D again
    assert second.results["fvd"] == first.results["fvd"] and second.results["fvd_real"] == 4
    real_updates.clear()
    other = validate(
        quality(weights, tmp_path, print_report=False, fid_weights=None, lpips=None, fvd=FVDProtocol(num_frames=None))
    )
    assert other.real_source["fvd"].startswith("computed") and real_updates.count(True) == 2


def test_missing_weights_fail_at_setup_with_the_file_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VDIFF_WEIGHTS", str(tmp_path / "w"))
    monkeypatch.setenv("VDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module = SimpleNamespace(evaluation=EvalProtocol())
    callback = VideoQuality(fvd_weights="i3d_torchscript.pt", lpips=None)
    with pytest.raises(FileNotFoundError) as err:
        callback.setup(None, module, "fit")
    cached = tmp_path / "cache" / "weights" / "i3d_torchscript.pt"
    assert str(err.value).startswith(
        f"FVD I3D (StyleGAN-V's TorchScript Kinetics-400 I3D) not found: i3d_torchscript.pt or "
        f"{tmp_path}/w/i3d_torchscript.pt or {cached} ($VDIFF_WEIGHTS={tmp_path}/w). i3d_torchscript.pt is not in "
        f"{cached.parent} and downloads are off (HF_HUB_OFFLINE=1)"
    )
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="VideoQuality: pass lpips: null to skip LPIPS") as err:
        VideoQuality(lpips="alex").setup(None, module, "fit")
    assert "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in str(err.value)


def test_select_frames_keeps_generated_frames_in_order():
    video = torch.arange(2 * 5).float().view(2, 5, 1, 1, 1)
    given = torch.tensor([[True, True, False, False, False], [True, True, False, False, False]])
    assert select_frames(video, given, "generated").flatten().tolist() == [2, 3, 4, 7, 8, 9]
    assert torch.equal(select_frames(video, given, "all"), video)
    with pytest.raises(ValueError, match="different numbers"):
        select_frames(
            video, torch.tensor([[True, False, False, False, False], [True, True, False, False, False]]), "generated"
        )


def test_data_id_follows_the_validation_shards(tmp_path):
    """Without an explicit id, the cache key's data part is the val shards (paths, sizes, times) and clip spec."""
    import os

    from tests.test_evaluate import clips, write_shards
    from vdiff.data.datamodule import DataSource

    folder = write_shards(tmp_path / "val", clips(0.0, 0))
    datamodule = SimpleNamespace(sources={"val": [DataSource(str(folder))]}, eval_spec=None, val_clips_per_video=1)
    trainer = SimpleNamespace(datamodule=datamodule, limit_val_batches=1.0, world_size=1)
    module = SimpleNamespace(evaluation=EvalProtocol())
    callback = VideoQuality(lpips=None)
    first = callback.data_id(trainer, module)
    assert str(folder / "shard-000000.tar") in first and callback.data_id(trainer, module) == first
    shard = folder / "shard-000001.tar"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1_000_000))  # a rewritten shard
    assert callback.data_id(trainer, module) != first
    trainer.limit_val_batches = 0.5  # fewer clips scored: other statistics
    assert callback.data_id(trainer, module) != first
    assert callback.data_id(SimpleNamespace(datamodule=None, limit_val_batches=1.0, world_size=1), module) is None
