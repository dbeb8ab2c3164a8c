"""SVD conditioning (vdiff.models.conditioners): CLIP image embedder architecture and preprocessing (against timm's
vit_huge_patch14_clip_224, diffusers' SVD pipeline and kornia), micro-conditioning values, motion buckets, the
concat branch and CFG dropout. Weight loading and parity of the embedder are in tests/weights/test_clip_convert.py."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from vdiff.diffusion.guidance import drop_conditions
from vdiff.models.conditioners import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_MOTION_BUCKETS,
    FLOW_FPS,
    FLOW_SIZE,
    MOTION_FPS_KEY,
    MOTION_SCORE_KEY,
    MOTION_SIZE_KEY,
    SVD_COND_AUG,
    SVD_FPS_ID,
    SVD_MOTION_BUCKET_ID,
    CLIPImageEmbedder,
    CLIPImageEmbedderConfig,
    SVDConditioner,
    added_time_ids,
    cfg_drop_probs,
    clip_preprocess,
    concat_condition,
    fit_motion_buckets,
    fps_id_from_fps,
    resize_antialiased,
    unconditional,
)
from vdiff.models.unet_svd import ADDED_TIME_IDS_KEY, CONCAT_KEY, CONTEXT_KEY

TOL = 1e-5
GOLDEN = Path(__file__).parent / "fixtures" / "clip_tiny_golden.safetensors"


# ----------------------------------------------------------------------------- config and architecture


def test_config_names_fields_and_validation():
    assert CLIPImageEmbedderConfig.from_name("vit-h-14") == CLIPImageEmbedderConfig()
    assert CLIPImageEmbedderConfig.from_name("tiny", depth=3).depth == 3
    with pytest.raises(ValueError, match="unknown size 'vit-g'"):
        CLIPImageEmbedderConfig.from_name("vit-g")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['heads'\]"):
        CLIPImageEmbedderConfig.from_name("tiny", heads=2)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        CLIPImageEmbedderConfig.from_name("tiny", num_heads=5)
    with pytest.raises(ValueError, match="act must be one of"):
        CLIPImageEmbedderConfig.from_name("tiny", act="relu")
    config = CLIPImageEmbedderConfig.from_name("tiny")
    assert CLIPImageEmbedderConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_vit_h_14_is_timm_vit_huge_patch14_clip_224():
    """The "vit-h-14" tower has exactly timm's vit_huge_patch14_clip_224 parameters, activation and norms."""
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        ours = CLIPImageEmbedder("vit-h-14")
        reference = timm.create_model("vit_huge_patch14_clip_224", pretrained=False, num_classes=0)
    visual = {
        k.removeprefix("visual."): tuple(v.shape) for k, v in ours.state_dict().items() if k.startswith("visual.")
    }
    assert visual == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert tuple(ours.proj.weight.shape) == (1024, 1280) and ours.proj.bias is None
    for a, b in (
        (ours.visual.blocks[0].mlp.act, reference.blocks[0].mlp.act),
        (ours.visual.norm, reference.norm),
        (ours.visual.norm_pre, reference.norm_pre),
    ):
        assert repr(a) == repr(b)
    assert ours.visual.global_pool == reference.global_pool == "token"
    assert sum(p.numel() for p in ours.parameters()) == 632_076_800  # 1280*1024 projection included
    assert ours.config.num_positions == 257


def test_tiny_uses_quick_gelu_like_transformers_defaults():
    embedder = CLIPImageEmbedder("tiny")
    assert type(embedder.visual.blocks[0].mlp.act).__name__ == "QuickGELU"
    x = torch.linspace(-3, 3, 13)
    torch.testing.assert_close(embedder.visual.blocks[0].mlp.act(x), x * torch.sigmoid(1.702 * x))


def test_forward_shapes():
    torch.manual_seed(0)
    embedder = CLIPImageEmbedder("tiny").eval()
    frames = torch.rand(2, 3, 40, 56) * 2 - 1
    with torch.no_grad():
        tokens = embedder(frames)
        pixels = embedder.preprocess(frames)
        embeds = embedder.embed_pixels(pixels)
    assert pixels.shape == (2, 3, 32, 32)
    assert tokens.shape == (2, 1, 24)
    torch.testing.assert_close(tokens[:, 0], embeds)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        embedder(frames.unsqueeze(1))


# ----------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("size", [(576, 1024), (100, 300), (224, 224), (64, 48)])
def test_resize_matches_diffusers_svd_pipeline(size):
    pipeline = pytest.importorskip("diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion")
    g = torch.Generator().manual_seed(sum(size))
    x = torch.rand(2, 3, *size, generator=g) * 2 - 1
    expected = pipeline._resize_with_antialiasing(x, (224, 224))
    got = resize_antialiased(x, (224, 224))
    assert got.shape == (2, 3, 224, 224)
    assert (got - expected).abs().max().item() <= TOL


def test_preprocess_matches_diffusers_svd_pipeline():
    """SVD pipeline's _encode_image on a tensor image: [0, 1] -> [-1, 1] -> antialiased resize -> [0, 1] -> CLIP
    normalisation by the pipeline's feature extractor (CLIPImageProcessor with CLIP's mean/std)."""
    pipeline = pytest.importorskip("diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion")
    transformers = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 320, 576, generator=g)  # [0, 1], as the pipeline takes tensors
    resized = (pipeline._resize_with_antialiasing(image * 2.0 - 1.0, (224, 224)) + 1.0) / 2.0
    processor = transformers.CLIPImageProcessor()
    assert tuple(processor.image_mean) == pytest.approx(CLIP_MEAN) and tuple(processor.image_std) == pytest.approx(
        CLIP_STD
    )
    expected = processor(
        images=resized, do_normalize=True, do_center_crop=False, do_resize=False, do_rescale=False, return_tensors="pt"
    ).pixel_values
    got = clip_preprocess(image * 2.0 - 1.0)
    assert got.shape == expected.shape == (2, 3, 224, 224)
    assert (got - expected).abs().max().item() <= TOL


def test_preprocess_matches_golden_diffusers_preprocessing():
    """The committed golden (diffusers' resize + CLIPImageProcessor at 32 px, see make_clip_golden.py) without
    importing the peers."""
    with safe_open(str(GOLDEN), framework="pt") as f:
        frames, pixels = f.get_tensor("io.frames"), f.get_tensor("io.pixels")
    got = CLIPImageEmbedder("tiny").preprocess(frames)
    assert (got - pixels).abs().max().item() <= TOL


def test_resize_matches_kornia_as_sgm_calls_it():
    kornia = pytest.importorskip("kornia")
    x = torch.rand(1, 3, 144, 256, generator=torch.Generator().manual_seed(1)) * 2 - 1
    expected = kornia.geometry.resize(x, (224, 224), interpolation="bicubic", align_corners=True, antialias=True)
    assert (resize_antialiased(x, (224, 224)) - expected).abs().max().item() <= TOL


# ----------------------------------------------------------------------------- micro-conditioning


def test_fps_id_is_fps_minus_one():
    assert fps_id_from_fps(7.0).item() == SVD_FPS_ID
    torch.testing.assert_close(fps_id_from_fps(torch.tensor([10.0, 12.5, 30.0])), torch.tensor([9.0, 11.5, 29.0]))
    with pytest.raises(ValueError, match="positive"):
        fps_id_from_fps(torch.tensor([10.0, 0.0]))


def test_added_time_ids_order_and_broadcast():
    ids = added_time_ids(torch.tensor([6.0, 9.0]), 127, torch.tensor([0.02, 0.1]))
    assert ids.dtype == torch.float32
    torch.testing.assert_close(ids, torch.tensor([[6.0, 127.0, 0.02], [9.0, 127.0, 0.1]]))
    assert added_time_ids(SVD_FPS_ID, SVD_MOTION_BUCKET_ID, SVD_COND_AUG, batch=3).shape == (3, 3)
    with pytest.raises(ValueError, match="batch sizes differ"):
        added_time_ids(torch.zeros(2), torch.zeros(3), 0.0)
    with pytest.raises(ValueError, match="scalar needs a batch size"):
        added_time_ids(1.0, 2.0, 3.0)


def test_added_time_ids_match_diffusers_pipeline():
    """diffusers' StableVideoDiffusionPipeline: __call__(fps=7) passes fps - 1 to _get_add_time_ids."""
    module = pytest.importorskip("diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion")
    fake = SimpleNamespace(
        unet=SimpleNamespace(
            config=SimpleNamespace(addition_time_embed_dim=256),
            add_embedding=SimpleNamespace(linear_1=SimpleNamespace(in_features=768)),
        )
    )
    fps, motion, aug = 7, 100, 0.05
    expected = module.StableVideoDiffusionPipeline._get_add_time_ids(
        fake,
        fps - 1,
        motion,
        aug,
        torch.float32,
        batch_size=2,
        num_videos_per_prompt=1,
        do_classifier_free_guidance=False,
    )
    got = added_time_ids(fps_id_from_fps(torch.full((2,), float(fps))), motion, aug)
    torch.testing.assert_close(got, expected)


# ----------------------------------------------------------------------------- motion buckets


def lognormal(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).mul(0.8).add(1.0).exp()


def test_motion_buckets_monotone_with_endpoints():
    buckets = fit_motion_buckets(lognormal(5000, 0))
    grid = torch.linspace(-1.0, buckets.scores[-1] * 2, 20001, dtype=torch.float64)
    ids = buckets(grid)
    assert ids.dtype == torch.long
    assert bool(torch.all(ids[1:] >= ids[:-1]))
    assert ids.min().item() == 0 and ids.max().item() == 255
    lo, hi = buckets.scores[0], buckets.scores[-1]
    assert buckets(torch.tensor([lo - 5.0, lo, hi, hi + 5.0])).tolist() == [0, 0, 255, 255]
    levels = buckets.level(grid)
    assert bool(torch.all(levels[1:] >= levels[:-1])) and levels.min() == 0.0 and levels.max() == 1.0


def test_fitted_buckets_are_uniform_on_the_fitting_set_and_close_on_fresh_scores():
    per_bucket = 40
    scores = lognormal(256 * per_bucket + 1, 1)
    buckets = fit_motion_buckets(scores)
    counts = torch.bincount(buckets(scores), minlength=256)
    assert counts.shape == (256,)
    assert counts.min().item() >= per_bucket and counts.max().item() <= per_bucket + 1  # the maximum joins bucket 255
    fresh = torch.bincount(buckets(lognormal(256 * per_bucket, 2)), minlength=256).double()
    # multinomial counts: mean 40, sd ~6.3; every bucket within 5 sd, and no bias towards either end
    assert (fresh - per_bucket).abs().max().item() < 5 * per_bucket**0.5
    assert abs(fresh[:128].sum().item() - fresh[128:].sum().item()) < 4 * (256 * per_bucket) ** 0.5


def test_fit_merges_tied_scores_at_mid_rank():
    scores = torch.cat([torch.zeros(300, dtype=torch.float64), lognormal(700, 3)])  # 30% exactly static
    buckets = fit_motion_buckets(scores)
    assert buckets.scores[0] == 0.0
    assert buckets.levels[0] == pytest.approx(0.15, abs=0.01)  # the middle of the static clips' quantile range
    ids = buckets(scores)
    assert ids[:300].unique().tolist() == [int(256 * buckets.levels[0])]
    counts = torch.bincount(ids[300:], minlength=256)
    above = counts[int(256 * 0.3) + 2 :]  # past the static clips' quantile range: equally populated (700 / 256 ~ 2.7)
    assert above.max().item() - above.min().item() <= 2
    assert counts[: int(256 * 0.3)].sum().item() <= 3  # inside it: one bucket for the ties, the rest (nearly) empty
    with pytest.raises(ValueError, match="all 5 scores are equal"):
        fit_motion_buckets([1.0] * 5)
    with pytest.raises(ValueError, match="finite"):
        fit_motion_buckets([1.0, float("nan")])


def test_default_motion_buckets_anchors():
    ids = DEFAULT_MOTION_BUCKETS(torch.tensor([0.0, 0.25, 0.5, 1.0, 2.0, 3.7, 4.0, 8.0, 16.0, 32.0, 64.0, 1e3]))
    assert ids.tolist() == [0, 0, 32, 64, 96, 123, 128, 160, 192, 224, 255, 255]


def test_score_of_reads_curation_extra_and_checks_units():
    extra = {MOTION_SCORE_KEY: 3.25, MOTION_FPS_KEY: 2.0, MOTION_SIZE_KEY: 128}
    assert DEFAULT_MOTION_BUCKETS.score_of(extra) == 3.25
    with pytest.raises(ValueError, match="motion_fps=4.0"):
        DEFAULT_MOTION_BUCKETS.score_of({**extra, MOTION_FPS_KEY: 4.0})
    with pytest.raises(KeyError, match="no 'motion_score'"):
        DEFAULT_MOTION_BUCKETS.score_of({"scene": 0})


def test_curation_writes_the_keys_and_units_the_buckets_read():
    """models may not import data: the json keys and motion-score defaults are repeated there, checked here."""
    from vdiff.data.convert import curation, folder

    assert (curation.DEFAULT_FLOW_FPS, curation.DEFAULT_FLOW_SIZE) == (FLOW_FPS, FLOW_SIZE)
    options = folder.ClipOptions()
    assert (options.flow_fps, options.flow_size) == (FLOW_FPS, FLOW_SIZE)
    source = inspect.getsource(folder)  # the converter writes extra.update(motion_score=..., ...)
    for key in (MOTION_SCORE_KEY, MOTION_FPS_KEY, MOTION_SIZE_KEY):
        assert f"{key}=" in source


# ----------------------------------------------------------------------------- concat branch, CFG


class StubPosterior:
    def __init__(self, mean: torch.Tensor) -> None:
        self.mean = mean

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator=None) -> torch.Tensor:  # never the concat latent
        return self.mean + 100.0


class StubAutoencoder:
    """encode: (B, T, 3, H, W) -> posterior whose mode is a fixed linear map to (B, T, 4, H/2, W/2); records inputs."""

    scale_factor = 0.18215
    latent_channels = 4

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []
        self.mix = torch.arange(12, dtype=torch.float32).view(4, 3) / 7.0 - 0.5

    def latent(self, video: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(video.flatten(0, 1), 2)  # (B*T, 3, H/2, W/2)
        mean = torch.einsum("oc,nchw->nohw", self.mix, pooled) + 0.25
        return mean.unflatten(0, video.shape[:2])

    def encode(self, video: torch.Tensor) -> StubPosterior:
        self.inputs.append(video.clone())
        return StubPosterior(self.latent(video))


def test_concat_is_the_unscaled_mode_of_the_noise_augmented_frame():
    g = torch.Generator().manual_seed(0)
    frame = torch.rand(3, 3, 8, 12, generator=g) * 2 - 1
    noise = torch.randn(frame.shape, generator=g)
    cond_aug = torch.tensor([0.0, 0.02, 0.5])
    ae = StubAutoencoder()
    got = concat_condition(ae, frame, cond_aug, num_frames=5, noise=noise)
    noisy = frame + cond_aug.view(3, 1, 1, 1) * noise
    torch.testing.assert_close(ae.inputs[0], noisy.unsqueeze(1), rtol=0, atol=0)
    expected = ae.latent(noisy.unsqueeze(1))  # (B, 1, 4, 4, 6): mode, no scale factor
    assert got.shape == (3, 5, 4, 4, 6)
    torch.testing.assert_close(got, expected.expand(-1, 5, -1, -1, -1), rtol=0, atol=0)
    # drawn noise: reproducible with a generator, and a scalar cond_aug applies to every clip
    a = concat_condition(ae, frame, 0.1, 2, generator=torch.Generator().manual_seed(7))
    b = concat_condition(ae, frame, torch.full((3,), 0.1), 2, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="noise shape"):
        concat_condition(ae, frame, 0.1, 2, noise=noise[:1])


def test_svd_conditioner_outputs():
    torch.manual_seed(0)
    conditioner = SVDConditioner("tiny").eval()
    ae = StubAutoencoder()
    g = torch.Generator().manual_seed(1)
    frame = torch.rand(2, 3, 16, 20, generator=g) * 2 - 1
    noise = torch.randn(frame.shape, generator=g)
    cond_aug = torch.tensor([0.02, 0.3])
    fps_id = fps_id_from_fps(torch.tensor([10.0, 7.0]))
    motion = DEFAULT_MOTION_BUCKETS(torch.tensor([3.0, 0.1]))
    with torch.no_grad():
        cond = conditioner(frame, ae, 14, fps_id=fps_id, motion_bucket_id=motion, cond_aug=cond_aug, noise=noise)
        clean = conditioner.image_embedder(frame)
    assert set(cond) == {CONTEXT_KEY, CONCAT_KEY, ADDED_TIME_IDS_KEY}
    torch.testing.assert_close(cond[CONTEXT_KEY], clean, rtol=0, atol=0)  # CLIP sees the clean frame
    assert cond[CONCAT_KEY].shape == (2, 14, 4, 8, 10)
    torch.testing.assert_close(
        cond[CONCAT_KEY][:, 0], ae.latent((frame + cond_aug.view(2, 1, 1, 1) * noise).unsqueeze(1))[:, 0]
    )
    torch.testing.assert_close(cond[ADDED_TIME_IDS_KEY], torch.tensor([[9.0, 112.0, 0.02], [6.0, 0.0, 0.3]]))
    # a precomputed (B, D) embedding (latent shards' image_embed) replaces the embedder
    embed = torch.randn(2, 24)
    cond2 = SVDConditioner(None)(frame, ae, 3, image_embed=embed, noise=noise)
    torch.testing.assert_close(cond2[CONTEXT_KEY], embed.unsqueeze(1))
    assert cond2[ADDED_TIME_IDS_KEY][:, 0].tolist() == [SVD_FPS_ID] * 2
    with pytest.raises(ValueError, match="no image embedder"):
        SVDConditioner(None)(frame, ae, 3)


def test_conditions_drive_the_svd_unet_with_and_without_guidance():
    """The cond keys and shapes are what vdiff.models.unet_svd reads; the CFG branch is unconditional(cond)."""
    from vdiff.diffusion.guidance import LinearCFG, guided_call
    from vdiff.models import unet_svd

    torch.manual_seed(0)
    unet = unet_svd.UNetSVD(unet_svd.UNetSVDConfig.from_name("tiny")).eval()
    conditioner = SVDConditioner(CLIPImageEmbedderConfig.from_name("tiny", embed_dim=unet.config.context_dim)).eval()
    frame = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        cond = conditioner(frame, StubAutoencoder(), 4, fps_id=fps_id_from_fps(10.0), motion_bucket_id=64)
        x = torch.randn(2, 4, 4, 16, 16)
        noise_level = torch.tensor([0.1, -0.5])
        out = unet(x, noise_level, cond, None)
        guided = guided_call(unet, x, noise_level, cond, unconditional(cond), None, LinearCFG(1.0, 2.5))
        uncond_out = unet(x, noise_level, {**cond, **unconditional(cond)}, None)
    assert out.shape == guided.shape == (2, 4, 4, 16, 16)
    # LinearCFG: scale 1 at frame 0 (the conditional output), 2.5 at the last frame
    torch.testing.assert_close(guided[:, 0], out[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        guided[:, -1], uncond_out[:, -1] + 2.5 * (out[:, -1] - uncond_out[:, -1]), rtol=1e-4, atol=1e-5
    )


def test_cfg_dropout_zeroes_exactly_the_dropped_samples():
    """vdiff.diffusion.guidance.drop_conditions with cfg_drop_probs: each condition its own Bernoulli per sample,
    dropped = zeros, kept = untouched, micro-conditioning never dropped."""
    g = torch.Generator().manual_seed(0)
    batch = 64
    cond = {
        CONTEXT_KEY: torch.randn(batch, 1, 24, generator=g),
        CONCAT_KEY: torch.randn(batch, 6, 4, 3, 5, generator=g),
        ADDED_TIME_IDS_KEY: torch.rand(batch, 3, generator=g) + 1.0,
    }
    dropped, keep = drop_conditions(
        cond, cfg_drop_probs(image=0.5, concat=0.25), torch.Generator().manual_seed(1), return_keep=True
    )
    for key in (CONTEXT_KEY, CONCAT_KEY):
        k = keep[key]
        assert 0 < int(k.sum()) < batch
        assert torch.equal(dropped[key][k], cond[key][k])
        assert bool(torch.all(dropped[key][~k] == 0))
        assert bool(torch.all(cond[key][~k].flatten(1).abs().sum(1) > 0))  # they were not zero before
    assert not torch.equal(keep[CONTEXT_KEY], keep[CONCAT_KEY])  # independent draws
    assert torch.equal(dropped[ADDED_TIME_IDS_KEY], cond[ADDED_TIME_IDS_KEY]) and bool(keep[ADDED_TIME_IDS_KEY].all())
    joint, keep2 = drop_conditions(
        cond,
        cfg_drop_probs(0.5, 0.5),
        torch.Generator().manual_seed(1),
        groups=[(CONTEXT_KEY, CONCAT_KEY)],
        return_keep=True,
    )
    assert torch.equal(keep2[CONTEXT_KEY], keep2[CONCAT_KEY])
    uncond = unconditional(cond)
    assert set(uncond) == {CONTEXT_KEY, CONCAT_KEY}
    assert all(bool(torch.all(v == 0)) and v.shape == cond[k].shape for k, v in uncond.items())
