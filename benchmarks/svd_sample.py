"""Image-to-video sampling time and peak memory of vdiff's SVDModule beside diffusers' StableVideoDiffusionPipeline
at the same config, with the same weights, in one run.

Both sides hold the same random weights: the script builds diffusers' ``UNetSpatioTemporalConditionModel``,
``AutoencoderKLTemporalDecoder`` and transformers' ``CLIPVisionModelWithProjection`` (every parameter perturbed, so
no layer is a zero-initialised no-op), converts their state dicts with vdiff's readers
(``vdiff.weights.unet_svd`` / ``autoencoder_convert`` / ``clip``, in memory) into an ``SVDModule``, and samples the
same image with the same settings: Euler over SVD's Karras grid (sigma 700 .. 0.002) for ``--steps`` steps,
frame-wise linear CFG (``--min-guidance`` .. ``--max-guidance``, cond/uncond batched in one call on both sides),
fps 7, motion bucket 127, noise augmentation 0.02, decoding in chunks of ``--decode-chunk`` frames. vdiff runs
``SVDModule.image_to_video`` (what ``vdiff sample --image`` runs); diffusers runs the pipeline's ``__call__``
with ``output_type="pt"``. A timed run is the whole call: CLIP, the VAE encode of the conditioning frame, the
sampling loop and the decode. The script first checks that the two videos agree (same seed: same noise).

Precision: ``--dtype float16`` / ``bfloat16`` casts both sides' weights (``module.to(dtype)``,
``pipe.to(dtype=...)``) as diffusers users load SVD (``torch_dtype=torch.float16``). The VAE config keeps
SVD's ``force_upcast: true``, so diffusers encodes the conditioning frame in float32 (casting its VAE there and
back each call); vdiff encodes in the run's dtype.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during one call minus the memory held before it (the
weights excluded, so it measures activations and workspace); on CPU the same quantity from resident-set size,
sampled every millisecond (``PeakRss`` of ``benchmarks/unet_step.py``). Calls alternate between the two sides so
that load on a shared machine hits both alike.

    python benchmarks/svd_sample.py                       # small config on CPU
    python benchmarks/svd_sample.py --quick               # tiny smoke run
    python benchmarks/svd_sample.py --device cuda --dtype float16 --model svd   # SVD at 576x1024, 14 frames, 25 steps
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from unet_step import PeakRss, synchronize  # benchmarks/ is the script's folder, hence on sys.path

from vdiff.diffusion.guidance import LinearCFG
from vdiff.lit.svd import SVDModule
from vdiff.models.autoencoder import VideoAutoencoder
from vdiff.models.conditioners import CLIPImageEmbedder
from vdiff.weights import autoencoder_convert
from vdiff.weights.autoencoder import config_from_diffusers as autoencoder_config
from vdiff.weights.clip import config_from_transformers, from_transformers
from vdiff.weights.unet_svd import config_from_diffusers as unet_config
from vdiff.weights.unet_svd import from_diffusers as unet_from_diffusers

CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal"
# stabilityai/stable-video-diffusion-img2vid(-xt) scheduler/scheduler_config.json
SVD_SCHEDULER = dict(
    beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, interpolation_type="linear",
    num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002, steps_offset=1,
    timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True,
)  # fmt: skip


@dataclass
class Preset:
    """Peer constructor arguments and the default workload of one config."""

    unet: dict
    vae: dict
    clip: dict
    height: int
    width: int
    frames: int
    steps: int
    decode_chunk: int


PRESETS = {
    # the parity test's models: a smoke run
    "tiny": Preset(
        unet=dict(block_out_channels=(32, 64), down_block_types=(CROSS_DOWN, PLAIN_DOWN), up_block_types=(PLAIN_UP, CROSS_UP),
                  layers_per_block=1, cross_attention_dim=32, num_attention_heads=(2, 4), addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=24),
        vae=dict(block_out_channels=(32, 64), layers_per_block=2),
        clip=dict(hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2, num_attention_heads=4,
                  image_size=224, patch_size=32),
        height=32, width=32, frames=6, steps=5, decode_chunk=3,
    ),
    # benchmarks/unet_step.py's "small" UNet (SVD's block pattern, 1024-d context), a 3-level temporal-decoder VAE
    # and a 4-layer CLIP at 224 px: a CPU-sized stand-in for SVD
    "small": Preset(
        unet=dict(block_out_channels=(64, 128, 128), down_block_types=(CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN),
                  up_block_types=(PLAIN_UP, CROSS_UP, CROSS_UP), layers_per_block=1, cross_attention_dim=1024,
                  num_attention_heads=(2, 4, 4), addition_time_embed_dim=64, projection_class_embeddings_input_dim=192),
        vae=dict(block_out_channels=(64, 128, 128), layers_per_block=2),
        clip=dict(hidden_size=256, intermediate_size=1024, projection_dim=1024, num_hidden_layers=4,
                  num_attention_heads=4, image_size=224, patch_size=14, hidden_act="gelu"),
        height=64, width=64, frames=8, steps=10, decode_chunk=4,
    ),
    # SVD itself (random weights): diffusers' UNet defaults are SVD's UNet, the VAE is SVD's vae/config.json; OpenCLIP ViT-H/14 as transformers
    # describes it in the SVD repository's image_encoder/config.json
    "svd": Preset(
        unet=dict(), vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2),
        clip=dict(hidden_size=1280, intermediate_size=5120, projection_dim=1024, num_hidden_layers=32,
                  num_attention_heads=16, image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5),
        height=576, width=1024, frames=14, steps=25, decode_chunk=7,
    ),
}  # fmt: skip


def perturb_(model: nn.Module, seed: int, scale: float = 0.02) -> nn.Module:
    """Random values everywhere (zero-initialised layers included), mix factors from N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise) if name.endswith("mix_factor") else p.add_(noise * scale)
    return model.eval()


def build_peer(preset: Preset, frames: int):
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()  # the fp16 VAE upcast warns on every call otherwise
    torch.manual_seed(0)
    unet = diffusers.UNetSpatioTemporalConditionModel(num_frames=frames, **preset.unet)
    levels = len(preset.vae["block_out_channels"])
    vae = diffusers.AutoencoderKLTemporalDecoder(down_block_types=("DownEncoderBlock2D",) * levels, **preset.vae)
    clip = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**preset.clip))
    return diffusers.StableVideoDiffusionPipeline(
        vae=perturb_(vae, 2), image_encoder=perturb_(clip, 3), unet=perturb_(unet, 1),
        scheduler=diffusers.EulerDiscreteScheduler(**SVD_SCHEDULER), feature_extractor=transformers.CLIPImageProcessor(),
    )  # fmt: skip


def build_ours(pipe, steps: int, low: float, high: float) -> SVDModule:
    """An SVDModule holding the pipeline's weights, converted in memory by vdiff's readers."""

    def config_json(model) -> dict:  # what save_pretrained would write to config.json
        return {**model.config, "_class_name": type(model).__name__}

    net_config = unet_config(config_json(pipe.unet), "peer UNet config")
    ae_config = autoencoder_config(config_json(pipe.vae), "peer VAE config")
    clip_config = config_from_transformers(json.loads(pipe.image_encoder.config.to_json_string()), "peer CLIP config")
    autoencoder = VideoAutoencoder(ae_config)
    autoencoder.load_state_dict(autoencoder_convert.from_diffusers(pipe.vae.state_dict(), ae_config))
    image_encoder = CLIPImageEmbedder(clip_config)
    image_encoder.load_state_dict(from_transformers(pipe.image_encoder.state_dict(), clip_config))
    module = SVDModule(net=net_config, image_encoder=image_encoder, autoencoder=autoencoder,
                       sampler=SVDModule.svd_sampler(steps=steps), guidance=LinearCFG(low, high))  # fmt: skip
    module.configure_model()
    module.net.load_state_dict(unet_from_diffusers(pipe.unet.state_dict(), net_config))
    return module.eval()


class Side:
    """One implementation, its timed calls and peak memory."""

    def __init__(self, name: str, call, device: torch.device, params: int) -> None:
        self.name, self.call, self.device, self.params = name, call, device, params
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.peak = 0

    def timed(self) -> None:
        synchronize(self.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        self.call()
        synchronize(self.device)
        self.times.append(time.perf_counter() - start)
        self.cpu_times.append(time.process_time() - cpu_start)

    def measure_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.call()
            synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - before
        else:
            with PeakRss() as rss:
                self.call()
            self.peak = rss.delta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--model", choices=sorted(PRESETS), default=None, help="default: small on CPU, svd on CUDA")
    parser.add_argument("--quick", action="store_true", help="the tiny config, 2 timed calls: a smoke run")
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"), help="image size in pixels")
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="Euler steps")
    parser.add_argument("--decode-chunk", type=int, default=None, help="frames decoded at a time (both sides)")
    parser.add_argument("--min-guidance", type=float, default=1.0)
    parser.add_argument("--max-guidance", type=float, default=2.5)
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per side (default 3 CPU, 5 CUDA)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--skip-check", action="store_true", help="do not compare the two videos first")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    name = "tiny" if args.quick else (args.model or ("small" if device.type == "cpu" else "svd"))
    preset = PRESETS[name]
    height, width = args.size or (preset.height, preset.width)
    frames = args.frames or preset.frames
    steps = args.steps or preset.steps
    chunk = args.decode_chunk or preset.decode_chunk
    repeats = args.repeats or (2 if args.quick else 3 if device.type == "cpu" else 5)
    low, high = args.min_guidance, args.max_guidance

    pipe = build_peer(preset, frames)
    module = build_ours(pipe, steps, low, high)
    pipe = pipe.to(device) if dtype == torch.float32 else pipe.to(device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    module = module.to(device=device, dtype=dtype)
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    from PIL import Image

    picture = Image.fromarray(pixels)  # diffusers takes a PIL image; vdiff the same pixels in [-1, 1]
    image = (torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1.0).to(device, dtype)

    def run_peer() -> torch.Tensor:
        return pipe(
            picture, height=height, width=width, num_frames=frames, num_inference_steps=steps, min_guidance_scale=low,
            max_guidance_scale=high, fps=7, motion_bucket_id=127, noise_aug_strength=0.02, decode_chunk_size=chunk,
            generator=torch.Generator(device).manual_seed(0), output_type="pt",
        ).frames  # (1, T, 3, H, W) in [0, 1]  # fmt: skip

    def run_ours() -> torch.Tensor:
        video = module.image_to_video(image, frames, fps_id=6, motion_bucket_id=127, cond_aug=0.02,
                                      generator=torch.Generator(device).manual_seed(0), decode_chunk=chunk)  # fmt: skip
        return (video.float() + 1) / 2  # (1, T, 3, H, W) in [0, 1], as the pipeline's "pt" output

    with torch.no_grad():
        if args.skip_check:
            check = "output check skipped"
        else:
            a, b = run_ours(), run_peer()
            check = (
                f"videos agree before timing: max abs diff {(a - b.float()).abs().max().item():.2e} "
                f"(frames in [0, 1]; same seed, same noise)"
            )
            del a, b
        count = lambda *models: sum(p.numel() for m in models for p in m.parameters())  # noqa: E731
        ours = Side(f"vdiff SVDModule + image_to_video ({name})", run_ours, device, count(module))
        peer = Side("diffusers StableVideoDiffusionPipeline", run_peer, device,
                    count(pipe.unet, pipe.vae, pipe.image_encoder))  # fmt: skip
        for _ in range(args.warmup):
            ours.call(), peer.call()
        for _ in range(repeats):  # alternate, so machine load drifts hit both alike
            for side in (ours, peer):
                side.timed()
        for side in (ours, peer):
            side.measure_peak()

    where = f"cpu ({torch.get_num_threads()} threads)" if device.type == "cpu" else torch.cuda.get_device_name(device)
    unet = module.net_config
    print(
        f"device {where} | dtype {args.dtype} | config {name} (UNet model_channels {unet.model_channels}, channel_mult "
        f"{unet.channel_mult}; VAE x{module.autoencoder.spatial_downsample}; CLIP width "
        f"{module.image_encoder.config.width} x {module.image_encoder.config.depth}) | image {width}x{height}, "
        f"{frames} frames, Euler {steps} steps, CFG {low}..{high} (2 x batch per call), decode chunks of {chunk} | "
        f"{repeats} timed calls per side after {args.warmup} warm-up"
    )
    print(check)
    header = f"{'implementation':<48} {'params':>9} {'median s':>9} {'mean s':>8} {'CPU s':>8} {'peak MiB':>9}"
    print(header)
    print("-" * len(header))
    for side in (ours, peer):
        median = statistics.median(side.times)
        print(
            f"{side.name:<48} {side.params / 1e6:>8.2f}M {median:>9.3f} {statistics.mean(side.times):>8.3f} "
            f"{statistics.median(side.cpu_times):>8.3f} {side.peak / 2**20:>9.1f}"
        )
    ratio = statistics.median(peer.times) / statistics.median(ours.times)
    cpu_ratio = statistics.median(peer.cpu_times) / statistics.median(ours.cpu_times)
    print(f"time ratio diffusers/ours (median): {ratio:.2f} wall, {cpu_ratio:.2f} CPU time  (> 1: vdiff faster)")
    print(f"peak memory ratio diffusers/ours: {peer.peak / max(ours.peak, 1):.2f}  (> 1: vdiff leaner)")
    if args.quick:
        print("(--quick is a smoke run: at this size per-op overhead sets the time; compare ratios from a full run)")


if __name__ == "__main__":
    main()
