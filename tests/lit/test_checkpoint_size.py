"""Lean checkpoints: EMA shadows stored once by name; a file-backed frozen autoencoder recorded by path
and sha256 instead of being stored, reloaded from its file, refused when the file changed or is gone."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from tests.lit.helpers import vdt_module
from tests.lit.test_network_hook import Clips
from vdiff.callbacks.checkpoint_eval import load_module
from vdiff.callbacks.ema import EMA
from vdiff.models.autoencoder import AutoencoderConfig, VideoAutoencoder
from vdiff.weights.autoencoder import save_autoencoder
from vdiff.weights.pretrained import PretrainedAutoencoder


def tensor_bytes(obj) -> int:
    """Bytes of every tensor reachable in a (nested) checkpoint structure."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def fit_and_save(module, tmp_path, callbacks=()):
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
                        default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(Clips(), batch_size=None))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    return path, torch.load(path, map_location="cpu", weights_only=False)


def test_ema_shadows_are_stored_once_by_name(tmp_path):
    module = vdt_module(patch_size=8, depth=2, hidden_size=64, num_heads=2, learn_sigma=False, configure=False)
    path, checkpoint = fit_and_save(module, tmp_path, [EMA(decay=0.9)])
    network = {n: p for n, p in module.named_parameters() if n.startswith("net.")}
    weight_bytes = sum(p.numel() * 4 for p in network.values())
    assert set(checkpoint["ema_state_dict"]) == set(network)
    ema_state = [v for k, v in checkpoint["callbacks"].items() if "EMA" in k]
    assert len(ema_state) == 1 and tensor_bytes(ema_state[0]) == 0  # counters only, no second copy
    # weights + EMA + AdamW's two moments; buffers (VDT's fixed tables) and counters on top.
    total = tensor_bytes(checkpoint)
    assert 4 * weight_bytes <= total < 4.1 * weight_bytes, (total, weight_bytes)
    assert path.stat().st_size < 4.2 * weight_bytes


@pytest.fixture
def vae_file(tmp_path):
    vae = VideoAutoencoder(AutoencoderConfig.from_name("tiny"))
    return save_autoencoder(vae, tmp_path / "weights" / "tiny-vae.safetensors")


def latent_module(vae_file):
    autoencoder = PretrainedAutoencoder(str(vae_file), layout="vdiff")
    return vdt_module(patch_size=2, depth=1, hidden_size=32, num_heads=2, learn_sigma=False, configure=False,
                      autoencoder=autoencoder, val_steps=2)


def test_file_backed_autoencoder_is_recorded_not_stored(tmp_path, vae_file):
    module = latent_module(vae_file)
    path, checkpoint = fit_and_save(module, tmp_path)
    assert not any(k.startswith("autoencoder.") for k in checkpoint["state_dict"])
    entry = checkpoint["vdiff_autoencoder"]
    assert entry["path"] == str(vae_file.resolve()) and entry["layout"] == "vdiff"
    assert entry["sha256"] == module.autoencoder.weights_sha256 and len(entry["sha256"]) == 64
    ae_bytes = sum(v.numel() * v.element_size() for v in module.autoencoder.state_dict().values())
    assert tensor_bytes(checkpoint) < 4.2 * sum(p.numel() * 4 for p in module.net.parameters()) < ae_bytes

    # Reloaded without the autoencoder (as `vdiff sample` does): rebuilt from the recorded file.
    loaded = load_module(str(path), use_ema=False)
    assert isinstance(loaded.autoencoder, VideoAutoencoder) and loaded.net.in_channels == 4
    for name, value in module.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    # Resuming with the recipe's autoencoder (same file) restores everything too.
    again = latent_module(vae_file)
    again.configure_model()
    again.on_load_checkpoint(checkpoint)
    again.load_state_dict(checkpoint["state_dict"])

    # A changed file or a missing one is refused with a message naming it.
    with open(vae_file, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="changed since the checkpoint was written"):
        load_module(str(path), use_ema=False)
    vae_file.unlink()
    with pytest.raises(FileNotFoundError, match="tiny-vae.safetensors"):
        load_module(str(path), use_ema=False)


def test_resuming_with_a_different_autoencoder_file_is_refused(tmp_path, vae_file):
    _, checkpoint = fit_and_save(latent_module(vae_file), tmp_path)
    other_vae = VideoAutoencoder(AutoencoderConfig.from_name("tiny"))
    other = latent_module(save_autoencoder(other_vae, tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="is not the autoencoder this checkpoint was trained with"):
        other.on_load_checkpoint(checkpoint)


def test_an_autoencoder_without_a_file_stays_in_the_checkpoint(tmp_path):
    module = vdt_module(patch_size=2, depth=1, hidden_size=32, num_heads=2, learn_sigma=False, configure=False,
                        autoencoder=VideoAutoencoder(AutoencoderConfig.from_name("tiny")))
    path, checkpoint = fit_and_save(module, tmp_path)
    assert any(k.startswith("autoencoder.") for k in checkpoint["state_dict"])
    assert "sha256" not in checkpoint["vdiff_autoencoder"]
    loaded = load_module(str(path), use_ema=False)
    assert torch.equal(loaded.autoencoder.encoder.conv_in.weight, module.autoencoder.encoder.conv_in.weight)


def test_a_lean_checkpoint_refuses_an_autoencoder_without_its_file(tmp_path, vae_file):
    """Resuming a lean checkpoint with a plain (file-less) autoencoder would load it with random weights."""
    _, checkpoint = fit_and_save(latent_module(vae_file), tmp_path)
    plain = vdt_module(patch_size=2, depth=1, hidden_size=32, num_heads=2, learn_sigma=False, configure=False,
                       autoencoder=VideoAutoencoder(AutoencoderConfig.from_name("tiny")))
    with pytest.raises(ValueError, match="an autoencoder without a weights file"):
        plain.on_load_checkpoint(checkpoint)


def test_a_moved_weights_file_is_found_under_vdiff_weights(tmp_path, vae_file, monkeypatch):
    path, _ = fit_and_save(latent_module(vae_file), tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    vae_file.rename(elsewhere / vae_file.name)
    monkeypatch.delenv("VDIFF_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match="VDIFF_WEIGHTS is not set"):
        load_module(str(path), use_ema=False)
    monkeypatch.setenv("VDIFF_WEIGHTS", str(elsewhere))
    assert isinstance(load_module(str(path), use_ema=False).autoencoder, VideoAutoencoder)


def test_checkpoints_of_python_built_modules_load_with_weights_only(tmp_path):
    """Lightning resumes with torch.load(weights_only=True): config objects in hparams must be allowed."""
    from vdiff.lit.svd import SVDModule  # noqa: F401 (registers the SVD config classes)

    module = vdt_module(patch_size=8, depth=1, hidden_size=32, num_heads=2, learn_sigma=False, configure=False)
    path, _ = fit_and_save(module, tmp_path, [EMA(decay=0.9)])
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["net"].hidden_size == 32


def test_sharded_checkpoints_keep_the_autoencoder_state(tmp_path, vae_file):
    """torch.distributed.checkpoint loads against the module's full state: sharded saves are not lean."""
    from types import SimpleNamespace

    module = latent_module(vae_file)
    module.configure_model()
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(_device_mesh=object()), datamodule=None)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert any(k.startswith("autoencoder.") for k in checkpoint["state_dict"])
    assert checkpoint["vdiff_autoencoder"]["sha256"] == module.autoencoder.weights_sha256
    module.on_load_checkpoint({k: v for k, v in checkpoint.items() if k != "state_dict"})  # DCP: no state_dict here
