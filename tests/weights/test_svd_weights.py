"""A whole SVD in one call (vdiff.weights.svd): a tiny random diffusers pipeline folder (UNetSpatioTemporalCondition
Model, AutoencoderKLTemporalDecoder, CLIPVisionModelWithProjection, each save_pretrained) loads, each part computing
what its peer computes; exports to the original single-file layout read back to the same tensors (also as a torch
checkpoint), exports to diffusers load with diffusers' and transformers' from_pretrained; every key of a single
file is accounted for (unknown keys named, known unused parts skipped by name, the concat-branch encoder copy
checked against the autoencoder)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.weights.helpers import diffusers_temporal
from vdiff.weights.safetensors_io import load_keys, save_state_dict
from vdiff.weights.svd import (
    CONCAT_ENCODER_PREFIX,
    TEXT_TOWER_REMNANTS,
    SVDWeightsError,
    classify_sgm_keys,
    load_svd,
    save_svd,
)
from vdiff.weights.unet_svd import UNetSVDConfigError

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

TOL = 1e-5  # fp32 parity bound
CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal"
UNET = dict(
    in_channels=8, out_channels=4, block_out_channels=(32, 64), down_block_types=(CROSS_DOWN, PLAIN_DOWN),
    up_block_types=(PLAIN_UP, CROSS_UP), layers_per_block=1, cross_attention_dim=32, num_attention_heads=(2, 4),
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=24, num_frames=6,
)  # fmt: skip
CLIP = dict(hidden_size=48, intermediate_size=96, projection_dim=32, num_hidden_layers=2, num_attention_heads=6,
            image_size=28, patch_size=7)  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturb_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else 0.05))
    return model


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """(folder, {part: peer model in eval mode}) of a tiny random SVD pipeline written by save_pretrained."""
    torch.manual_seed(0)
    unet = perturb_(diffusers.UNetSpatioTemporalConditionModel(**UNET), 1).eval()
    vae = diffusers_temporal(diffusers, (32, 64), seed=2)
    with torch.no_grad():  # SVD's original autoencoder has no quant_conv (the identity), so sgm can hold this one
        vae.quant_conv.weight.copy_(torch.eye(8).view(8, 8, 1, 1))
        vae.quant_conv.bias.zero_()
    image_encoder = perturb_(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**CLIP)), 3)
    folder = tmp_path_factory.mktemp("svd") / "stable-video-diffusion-img2vid"
    for name, model in (("unet", unet), ("vae", vae), ("image_encoder", image_encoder.eval())):
        model.save_pretrained(folder / name)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableVideoDiffusionPipeline"}))
    return folder, {"unet": unet, "vae": vae, "image_encoder": image_encoder}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def assert_same_weights(a, b) -> None:
    for part in ("unet", "image_encoder", "autoencoder"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert set(sa) == set(sb), part
        assert all(torch.equal(sa[k], sb[k]) for k in sa), part


# ----------------------------------------------------------------------------- diffusers folder


def test_a_pipeline_folder_loads_in_one_call_and_every_part_computes_what_its_peer_computes(pipeline):
    folder, peers = pipeline
    weights = load_svd(folder)
    assert weights.layout == "diffusers" and weights.path == folder and weights.unet.config.norm_eps == "diffusers"
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # UNet: (B, T) = (2, 3) clips, a 2-token context
        x, concat = torch.randn(2, 3, 4, 8, 8, generator=g), torch.randn(2, 3, 4, 8, 8, generator=g)
        t, context, ids = (
            torch.randn(2, generator=g),
            torch.randn(2, 2, 32, generator=g),
            torch.randn(2, 3, generator=g),
        )
        ours = weights.unet.eval()(x, t, {"context": context, "concat": concat, "added_time_ids": ids})
        theirs = peers["unet"](torch.cat([x, concat], dim=2), t, context, ids).sample
        assert max_diff(ours, theirs) <= TOL * max(1.0, theirs.abs().max().item())
        # autoencoder: posterior of every frame, temporal decoding of the clip
        video = torch.rand(2, 3, 3, 16, 16, generator=g) * 2 - 1
        posterior = weights.autoencoder.eval().encode(video)
        reference = peers["vae"].encode(video.flatten(0, 1)).latent_dist
        assert max_diff(posterior.mean.flatten(0, 1), reference.mean) <= TOL
        z = posterior.mean
        decoded = peers["vae"].decode(z.flatten(0, 1), num_frames=3).sample.unflatten(0, (2, 3))
        assert max_diff(weights.autoencoder.decode(z), decoded) <= TOL
        # CLIP image embedding of preprocessed pixels
        pixels = torch.randn(3, 3, 28, 28, generator=g)
        expected = peers["image_encoder"](pixel_values=pixels).image_embeds
        assert max_diff(weights.image_encoder.eval().embed_pixels(pixels), expected) <= TOL


def test_an_incomplete_or_foreign_pipeline_folder_is_refused(pipeline, tmp_path):
    folder, _ = pipeline
    partial = tmp_path / "partial"
    for part in ("unet", "vae"):
        (partial / part).mkdir(parents=True)
        for file in (folder / part).iterdir():
            (partial / part / file.name).write_bytes(file.read_bytes())
    with pytest.raises(
        FileNotFoundError, match=r"partial: not a diffusers SVD pipeline folder: no image_encoder/config"
    ):
        load_svd(partial)
    (partial / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(SVDWeightsError, match=r"model_index\.json: _class_name='StableDiffusionPipeline'"):
        load_svd(partial)
    with pytest.raises(FileNotFoundError, match="SVD weights"):
        load_svd(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- exports


def test_sgm_export_reads_back_the_same_values(pipeline, tmp_path):
    folder, _ = pipeline
    weights = load_svd(folder)
    path = tmp_path / "svd.safetensors"
    with pytest.raises(
        UNetSVDConfigError, match=r"(?s)norm_eps=.diffusers. has no sgm equivalent.*convert_norm_eps=True"
    ):
        save_svd(weights, path, layout="sgm")  # a diffusers UNet's epsilons are not sgm's: only on purpose
    save_svd(weights, path, layout="sgm", convert_norm_eps=True)
    groups = classify_sgm_keys(load_keys(path))
    assert not groups["unknown"] and not groups["skipped"]
    assert groups["unet"] and groups["autoencoder"] and groups["image_encoder"] and groups["concat_encoder"]
    back = load_svd(path)  # configs from the file's metadata; the concat-branch copy checked
    assert back.layout == "sgm" and back.unet.config == weights.unet.config.replace(norm_eps="sgm")
    assert back.autoencoder.config == weights.autoencoder.config
    assert back.image_encoder.config == weights.image_encoder.config
    assert_same_weights(back, weights)
    # the same tensors in a torch checkpoint (Lightning-style wrapper): read once, same result
    from safetensors.torch import load_file

    torch.save({"state_dict": load_file(str(path))}, tmp_path / "svd.ckpt")
    ckpt = load_svd(tmp_path / "svd.ckpt", unet_config=back.unet.config, autoencoder_config=back.autoencoder.config,
                    image_encoder_config=back.image_encoder.config)  # fmt: skip
    assert_same_weights(ckpt, weights)


def test_diffusers_export_loads_with_diffusers_and_transformers_from_pretrained(pipeline, tmp_path):
    folder, peers = pipeline
    weights = load_svd(folder)
    out = save_svd(weights, tmp_path / "exported")
    loaded = {
        "unet": diffusers.UNetSpatioTemporalConditionModel.from_pretrained(out / "unet"),
        "vae": diffusers.AutoencoderKLTemporalDecoder.from_pretrained(out / "vae"),
        "image_encoder": transformers.CLIPVisionModelWithProjection.from_pretrained(out / "image_encoder"),
    }
    for part, model in loaded.items():
        expected = peers[part].state_dict()
        state = model.state_dict()
        assert set(state) == set(expected), part
        assert all(torch.equal(state[k], expected[k]) for k in expected), part
    assert_same_weights(load_svd(out), weights)
    # an sgm-read UNet exports to diffusers only on purpose
    sgm = tmp_path / "svd.safetensors"
    save_svd(weights, sgm, layout="sgm", convert_norm_eps=True)
    with pytest.raises(UNetSVDConfigError, match=r"norm_eps='sgm' has no diffusers equivalent"):
        save_svd(load_svd(sgm), tmp_path / "again")


def test_exports_refuse_what_the_layout_cannot_hold(pipeline, tmp_path):
    folder, _ = pipeline
    weights = load_svd(folder)
    with torch.no_grad():
        weights.autoencoder.quant_conv.weight.mul_(2)
    with pytest.raises(ValueError, match=r"quant_conv is not the identity"):
        save_svd(weights, tmp_path / "svd.safetensors", layout="sgm", convert_norm_eps=True)
    with pytest.raises(ValueError, match=r"one \.safetensors file"):
        save_svd(weights, tmp_path / "svd.ckpt", layout="sgm")
    with pytest.raises(ValueError, match=r"is a folder"):
        save_svd(weights, tmp_path / "svd.safetensors", layout="diffusers")


# ----------------------------------------------------------------------------- sgm key accounting


@pytest.fixture
def sgm_file(pipeline, tmp_path):
    """(path, tensors, weights) of an sgm export of the pipeline, for tests that edit its keys."""
    weights = load_svd(pipeline[0])
    path = save_svd(weights, tmp_path / "svd.safetensors", layout="sgm", convert_norm_eps=True)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    return path, tensors, metadata


def test_unknown_keys_are_named_with_the_file_and_known_unused_parts_are_skipped_by_name(sgm_file):
    path, tensors, metadata = sgm_file
    remnants = {name: torch.zeros(2) for name in TEXT_TOWER_REMNANTS[:-1]}  # as in svd.safetensors
    decoder = {CONCAT_ENCODER_PREFIX + "decoder.conv_in.weight": torch.zeros(2),
               CONCAT_ENCODER_PREFIX + "post_quant_conv.weight": torch.zeros(2)}  # fmt: skip
    extra = {"model_ema.decay": torch.zeros(()), "conditioner.embedders.1.foo": torch.zeros(1)}
    save_state_dict({**tensors, **remnants, **decoder, **extra}, path, metadata=metadata)
    with pytest.raises(SVDWeightsError) as error:
        load_svd(path)
    message = str(error.value)
    assert str(path) in message and "2 key(s)" in message
    assert "model_ema.decay" in message and "conditioner.embedders.1.foo" in message
    assert "ln_final" not in message and "decoder.conv_in" not in message
    weights = load_svd(path, skip_prefixes=("model_ema.", "conditioner.embedders.1."))
    assert set(weights.skipped) == {*remnants, *decoder, *extra}


def test_a_missing_part_is_named(sgm_file):
    path, tensors, metadata = sgm_file
    save_state_dict({k: v for k, v in tensors.items() if not k.startswith("conditioner.")}, path, metadata=metadata)
    with pytest.raises(SVDWeightsError, match=r"not a whole SVD: no tensor under conditioner\.embedders\.0\.open_clip"):
        load_svd(path)


def test_the_concat_branch_encoder_copy_must_compute_what_the_autoencoder_computes(sgm_file):
    path, tensors, metadata = sgm_file
    out, quant = "encoder.conv_out.", "quant_conv."
    # a copy that folds a random invertible quant_conv into its conv_out computes the same posterior: accepted
    q = torch.randn(8, 8, generator=torch.Generator().manual_seed(0)) + 3 * torch.eye(8)
    qb = torch.randn(8, generator=torch.Generator().manual_seed(1))
    w, b = tensors[CONCAT_ENCODER_PREFIX + out + "weight"], tensors[CONCAT_ENCODER_PREFIX + out + "bias"]
    inverse = torch.linalg.inv(q.double())
    folded = dict(tensors)
    folded[CONCAT_ENCODER_PREFIX + out + "weight"] = torch.einsum("oj,jchw->ochw", inverse, w.double()).float()
    folded[CONCAT_ENCODER_PREFIX + out + "bias"] = (inverse @ (b.double() - qb.double())).float()
    folded[CONCAT_ENCODER_PREFIX + quant + "weight"] = q.view(8, 8, 1, 1)
    folded[CONCAT_ENCODER_PREFIX + quant + "bias"] = qb
    save_state_dict(folded, path, metadata=metadata)
    load_svd(path)
    # another encoder is refused, naming the tensor; concat_encoder="skip" loads it on purpose
    other = dict(tensors)
    other[CONCAT_ENCODER_PREFIX + "encoder.conv_in.weight"] = (
        other[CONCAT_ENCODER_PREFIX + "encoder.conv_in.weight"] + 0.1
    )
    save_state_dict(other, path, metadata=metadata)
    with pytest.raises(SVDWeightsError, match=r"(?s)another posterior mode.*embedders\.3\.encoder\.encoder\.conv_in"):
        load_svd(path)
    skipped = load_svd(path, concat_encoder="skip").skipped
    assert CONCAT_ENCODER_PREFIX + "encoder.conv_in.weight" in skipped
    del other[CONCAT_ENCODER_PREFIX + "quant_conv.bias"]
    save_state_dict(other, path, metadata=metadata)
    with pytest.raises(SVDWeightsError, match=r"(?s)does not fit the autoencoder.*missing.*quant_conv\.bias"):
        load_svd(path)


def test_a_passed_config_may_not_contradict_the_files_metadata(sgm_file):
    path, _, metadata = sgm_file
    config = json.loads(metadata["vdiff_image_encoder_config"])
    with pytest.raises(SVDWeightsError, match=r"image_encoder config passed contradicts.*\n  depth: passed 3"):
        load_svd(path, image_encoder_config={**config, "depth": 3})
    assert load_svd(path, image_encoder_config=config).image_encoder.config.depth == config["depth"]


def test_real_svd_key_groups_are_accounted_for():
    """The key groups of the real svd.safetensors beyond the parts (as loaders report them as left over)."""
    keys = [
        "model.diffusion_model.input_blocks.0.0.weight",
        "first_stage_model.decoder.conv_out.time_mix_conv.weight",
        "conditioner.embedders.0.open_clip.model.visual.conv1.weight",
        "conditioner.embedders.0.open_clip.model.ln_final.bias",
        "conditioner.embedders.0.open_clip.model.logit_scale",
        "conditioner.embedders.0.open_clip.model.positional_embedding",
        "conditioner.embedders.0.open_clip.model.text_projection",
        "conditioner.embedders.0.open_clip.model.token_embedding.weight",
        "conditioner.embedders.3.encoder.decoder.mid.attn_1.k.bias",
        "conditioner.embedders.3.encoder.post_quant_conv.weight",
        "conditioner.embedders.3.encoder.encoder.down.0.block.0.conv1.weight",
        "conditioner.embedders.3.encoder.quant_conv.weight",
    ]
    groups = classify_sgm_keys(keys)
    assert {k: len(v) for k, v in groups.items()} == {"unet": 1, "autoencoder": 1, "image_encoder": 1,
                                                       "concat_encoder": 2, "skipped": 7, "unknown": 0}  # fmt: skip


def test_reading_an_sgm_file_reads_only_the_parts_tensors(sgm_file, monkeypatch):
    path, tensors, metadata = sgm_file
    import vdiff.weights.svd as svd_module

    unused = {name: torch.zeros(2) for name in TEXT_TOWER_REMNANTS[:-1]}
    unused[CONCAT_ENCODER_PREFIX + "decoder.conv_in.weight"] = torch.zeros(2)
    save_state_dict({**tensors, **unused}, path, metadata=metadata)
    asked: list[str] = []
    original = svd_module._SingleFile.get

    def spy(self, names):
        asked.extend(names)
        return original(self, names)

    monkeypatch.setattr(svd_module._SingleFile, "get", spy)
    weights = load_svd(path)
    assert sorted(asked) == sorted(tensors) and len(asked) == len(set(asked))  # each used tensor read once, no other
    assert set(weights.skipped) == set(unused)
