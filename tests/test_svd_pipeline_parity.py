"""End-to-end parity of vdiff's SVD image-to-video with diffusers' ``StableVideoDiffusionPipeline``.

A tiny random pipeline (UNetSpatioTemporalConditionModel, AutoencoderKLTemporalDecoder, CLIPVisionModelWithProjection,
CLIPImageProcessor and SVD's EulerDiscreteScheduler config) is written with ``save_pretrained``; vdiff reads the
same folder (``vdiff.weights.unet_svd`` / ``autoencoder`` / ``clip``) into an ``SVDModule`` and samples through
``SVDModule.image_to_video`` / ``image_latents`` (what ``vdiff sample --image`` calls), every setting an argument.

Measured in fp32 on CPU (1 thread): latents within 1.6e-5 of the pipeline's (|latents| up to 5.0), decoded frames
within 2.7e-6 (in [0, 1]). The sigma grid, the UNet's c_noise timesteps, the CLIP embedding, the added time ids
and the random draws are bit-identical; the concat latent differs by 2.4e-6 (the two VAE encoders' kernels) and
each UNet call by ~1e-6 relative, which 25 Euler steps from sigma 700 carry into the latents. Bounds below: 1e-4
(latents) and 2e-5 (frames).

Differences that are behaviour, not rounding, pinned by the last tests:

- decode chunks: diffusers cuts ``decode_chunk_size`` chunks from the start (a shorter last chunk), vdiff's
  autoencoder decodes the fewest full-size windows spread evenly (cross-faded where they overlap); both agree
  when the chunk size divides the clip length (the temporal decoder sees different frames together otherwise);
- guidance: diffusers runs no unconditional branch at all when ``max_guidance_scale <= 1`` (ignoring a
  ``min_guidance_scale`` below 1); vdiff drops guidance only for scales (1, 1), where both are the plain
  conditional model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from vdiff.diffusion.guidance import LinearCFG  # noqa: E402
from vdiff.diffusion.karras import karras_sigmas  # noqa: E402
from vdiff.lit.svd import SVDModule  # noqa: E402
from vdiff.models.conditioners import fps_id_of  # noqa: E402
from vdiff.weights.autoencoder import load_autoencoder  # noqa: E402
from vdiff.weights.clip import load_clip_image_embedder  # noqa: E402
from vdiff.weights.unet_svd import load_unet_svd  # noqa: E402

LATENT_TOL = 1e-4  # measured 1.6e-5
FRAME_TOL = 2e-5  # measured 2.7e-6 (frames in [0, 1])
FRAMES, SIZE = 6, 16  # clip length; image side (latents 8x8: VAE x2, UNet x2)

# stabilityai/stable-video-diffusion-img2vid(-xt) scheduler/scheduler_config.json
SVD_SCHEDULER = dict(
    beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, interpolation_type="linear",
    num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002, steps_offset=1,
    timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True,
)  # fmt: skip


def perturb_(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Random values in every parameter (zero-initialised layers included); mix factors from N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise) if name.endswith("mix_factor") else p.add_(noise * scale)
    return model.eval()


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(diffusers pipeline read back from its folder, vdiff SVDModule from the same folder)."""
    torch.manual_seed(0)
    unet = diffusers.UNetSpatioTemporalConditionModel(
        sample_size=SIZE // 2, in_channels=8, out_channels=4, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), layers_per_block=1,
        cross_attention_dim=32, num_attention_heads=(2, 4), addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24, num_frames=FRAMES,
    )  # fmt: skip
    vae = diffusers.AutoencoderKLTemporalDecoder(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, block_out_channels=(32, 64),
        layers_per_block=2, latent_channels=4,
    )  # fmt: skip
    # the pipeline resizes to 224 for CLIP whatever the model's size: a 224 input, 7x7 patches of 32
    clip = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2, num_attention_heads=4,
        image_size=224, patch_size=32,
    ))  # fmt: skip
    pipe = diffusers.StableVideoDiffusionPipeline(
        vae=perturb_(vae, 2), image_encoder=perturb_(clip, 3), unet=perturb_(unet, 1),
        scheduler=diffusers.EulerDiscreteScheduler(**SVD_SCHEDULER), feature_extractor=transformers.CLIPImageProcessor(),
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("svd-pipeline") / "pipeline"
    pipe.save_pretrained(folder)
    pipe = diffusers.StableVideoDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)

    net = load_unet_svd(folder)
    module = SVDModule(
        net=net.config, image_encoder=load_clip_image_embedder(folder), autoencoder=load_autoencoder(folder),
        sampler=SVDModule.svd_sampler(steps=25), guidance=LinearCFG(1.0, 2.5),
    )  # fmt: skip
    module.configure_model()
    module.net.load_state_dict(net.state_dict())
    return pipe, module.eval()


@pytest.fixture(scope="module")
def image():
    """(PIL image for diffusers, the same pixels as (1, 3, H, W) in [-1, 1] for vdiff)."""
    pixels = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    return Image.fromarray(pixels), x


def run_pipeline(pipe, picture, steps, low, high, fps, motion, aug, chunk, seed, output_type="pt", latents=None):
    return pipe(
        picture, height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=steps, min_guidance_scale=low,
        max_guidance_scale=high, fps=fps, motion_bucket_id=motion, noise_aug_strength=aug, decode_chunk_size=chunk,
        generator=torch.Generator().manual_seed(seed), latents=latents, output_type=output_type,
    ).frames  # fmt: skip


SETTINGS = [  # steps, min/max guidance, fps, motion bucket, noise_aug_strength (cond_aug), decode chunk, seed
    pytest.param(25, 1.0, 2.5, 7, 127, 0.02, 3, 7, id="svd-defaults-chunk3"),
    pytest.param(12, 1.5, 3.0, 10, 40, 0.1, None, 11, id="xt-guidance-fps10-whole-decode"),
]


def test_the_scheduler_is_svds_sampler(models):
    pipe, module = models
    pipe.scheduler.set_timesteps(25)
    sigmas = karras_sigmas(25, module.sampler.sigma_min, module.sampler.sigma_max, module.sampler.rho)
    assert torch.equal(pipe.scheduler.sigmas, sigmas)  # the same float32 grid, 700 ... 0.002, 0
    assert torch.equal(pipe.scheduler.timesteps, 0.25 * sigmas[:-1].log())  # the UNet sees c_noise
    assert float(pipe.scheduler.init_noise_sigma) == pytest.approx((1 + 700.0**2) ** 0.5)  # init_noise_scale="svd"
    assert module.sampler.init_noise_scale == "svd" and module.sampler.name == "euler"


@pytest.mark.parametrize("steps, low, high, fps, motion, aug, chunk, seed", SETTINGS)
def test_same_seed_same_video(models, image, steps, low, high, fps, motion, aug, chunk, seed):
    """Same weights, image, seed and settings: vdiff draws the conditioning-frame noise and then the initial
    latents from the generator in diffusers' order, so the whole pipeline lines up."""
    pipe, module = models
    picture, x = image
    expected = run_pipeline(pipe, picture, steps, low, high, fps, motion, aug, chunk, seed)  # (1, T, 3, H, W) in [0, 1]
    expected_latents = run_pipeline(pipe, picture, steps, low, high, fps, motion, aug, chunk, seed, "latent")
    settings = dict(fps_id=fps_id_of(fps), motion_bucket_id=motion, cond_aug=aug, guidance=LinearCFG(low, high),
                    sampler=module.sampler_with(steps=steps))  # fmt: skip
    latents = module.image_latents(x, FRAMES, generator=torch.Generator().manual_seed(seed), **settings)
    video = module.image_to_video(x, FRAMES, generator=torch.Generator().manual_seed(seed), decode_chunk=chunk,
                                  **settings)  # fmt: skip
    torch.testing.assert_close(latents, expected_latents, atol=LATENT_TOL, rtol=0)
    torch.testing.assert_close((video + 1) / 2, expected, atol=FRAME_TOL, rtol=0)
    assert float(((expected > 0) & (expected < 1)).float().mean()) > 0.5  # mostly unclamped: a real comparison
    assert module.guidance.max_scale == 2.5 and module.cond_config.fps_id is None  # the module's own settings


def test_same_initial_latents_and_augmentation_noise(models, image):
    """The pipeline's ``latents=`` (standard normal; both samplers scale it by sqrt(1 + 700^2)) fed to vdiff's
    sampler as ``noise``; the augmentation noise is the generator's first draw in both."""
    pipe, module = models
    picture, x = image
    noise = torch.randn(1, FRAMES, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(5))
    expected = run_pipeline(pipe, picture, 25, 1.0, 3.0, 7, 127, 0.02, 2, 3, latents=noise.clone())
    settings = dict(fps_id=6, motion_bucket_id=127, cond_aug=0.02, guidance=LinearCFG(1.0, 3.0), noise=noise)
    video = module.image_to_video(x, FRAMES, generator=torch.Generator().manual_seed(3), decode_chunk=2, **settings)
    torch.testing.assert_close((video + 1) / 2, expected, atol=FRAME_TOL, rtol=0)
    other_seed = module.image_latents(x, FRAMES, generator=torch.Generator().manual_seed(4), **settings)
    same_seed = module.image_latents(x, FRAMES, generator=torch.Generator().manual_seed(3), **settings)
    assert (other_seed - same_seed).abs().max() > 100 * LATENT_TOL  # the augmentation noise matters


def test_guidance_one_is_the_conditional_model(models, image):
    """Scales (1, 1): diffusers skips the unconditional branch; vdiff does too (module.guidance None)."""
    pipe, module = models
    picture, x = image
    expected = run_pipeline(pipe, picture, 8, 1.0, 1.0, 7, 127, 0.02, None, 1, "latent")
    assert module.image_to_video_settings(FRAMES, guidance=LinearCFG(1.0, 1.0)).guidance is None
    latents = module.image_latents(x, FRAMES, fps_id=6, motion_bucket_id=127, guidance=LinearCFG(1.0, 1.0),
                                   sampler=module.sampler_with(steps=8), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(latents, expected, atol=LATENT_TOL, rtol=0)


def test_guidance_below_one_is_ignored_by_diffusers_only(models, image):
    """min 0.5 / max 1.0: diffusers sees max <= 1 and runs no CFG at all; vdiff applies LinearCFG(0.5, 1.0)."""
    pipe, module = models
    picture, x = image
    plain = run_pipeline(pipe, picture, 8, 1.0, 1.0, 7, 127, 0.02, None, 1, "latent")
    assert torch.equal(run_pipeline(pipe, picture, 8, 0.5, 1.0, 7, 127, 0.02, None, 1, "latent"), plain)
    ours = module.image_latents(x, FRAMES, fps_id=6, motion_bucket_id=127, guidance=LinearCFG(0.5, 1.0),
                                sampler=module.sampler_with(steps=8), generator=torch.Generator().manual_seed(1))
    assert (ours - plain).abs().max() > 100 * LATENT_TOL


def test_decode_chunks_that_do_not_divide_the_clip(models, image):
    """Chunk 4 of 6 frames: diffusers decodes frames [0, 4) and [4, 6); vdiff decodes the full-size windows
    [0, 4) and [2, 6), cross-fading frames 2-3. Decoding diffusers' chunks with vdiff's autoencoder reproduces
    diffusers; vdiff's own windows give another (seam-free) video."""
    pipe, module = models
    picture, x = image
    latents = run_pipeline(pipe, picture, 6, 1.0, 2.5, 7, 127, 0.02, None, 2, "latent")
    expected = pipe.video_processor.postprocess_video(pipe.decode_latents(latents, FRAMES, 4), output_type="pt")
    halves = [module.decode_latents(latents[:, a:b], chunk=None) for a, b in ((0, 4), (4, 6))]
    torch.testing.assert_close((torch.cat(halves, dim=1) + 1) / 2, expected, atol=FRAME_TOL, rtol=0)
    ours = (module.decode_latents(latents, chunk=4) + 1) / 2
    torch.testing.assert_close(ours[:, :2], expected[:, :2], atol=FRAME_TOL, rtol=0)  # the first window is shared
    assert (ours[:, 2:] - expected[:, 2:]).abs().max() > 100 * FRAME_TOL
