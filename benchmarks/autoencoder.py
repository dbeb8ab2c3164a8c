"""Autoencoder throughput and peak memory: vdiff VideoAutoencoder beside diffusers AutoencoderKLTemporalDecoder.

Both models hold the same random weights (diffusers' converted with ``from_diffusers``) and run in one process,
one after the other, on the same inputs. Reports encode and decode frames/s, peak memory, and chunked vs full
decode peak memory (vdiff chunking with overlap; diffusers chunked as its SVD pipeline does, without overlap).

    python benchmarks/autoencoder.py --quick                 # tiny config, CPU, seconds
    python benchmarks/autoencoder.py --config small          # 4 levels (64..256 ch), 128 px, 8 frames
    python benchmarks/autoencoder.py --config svd --device cuda --size 576 1024 --frames 14

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the allocation before the call; on CPU the
process's resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) above the RSS
before the call, which includes allocator slack and so is approximate. diffusers is needed (test extra).

FLOPs and MFU: every case's FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on meta-device
copies of both models (no compute); MFU = FLOPs / fastest time / the matmul rate measured in the same run
(``matmul_rate`` of ``benchmarks/unet_step.py``: 8192^3 on CUDA). Overlapped chunks decode more frames, so their
FLOPs are higher for the same output. ``--json PATH`` also writes the table as JSON.

    python benchmarks/autoencoder.py --config svd --device cuda --dtype bfloat16 --size 576 1024 --frames 14 --chunk 4 --overlap 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vdiff.data.frame_size import add_size_argument  # noqa: E402
from vdiff.models.autoencoder import VideoAutoencoder, window_starts  # noqa: E402
from vdiff.weights.autoencoder import config_from_diffusers  # noqa: E402
from vdiff.weights.autoencoder_convert import from_diffusers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unet_step import matmul_rate  # noqa: E402

PRESETS = {  # block_out_channels, layers_per_block, default size, default frames
    "tiny": ((32, 64), 2, (64, 64), 8),
    "small": ((64, 128, 256, 256), 2, (128, 128), 8),
    "svd": ((128, 256, 512, 512), 2, (320, 576), 14),
}


# ----------------------------------------------------------------------------- measurement


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def peak_memory(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory (MiB) ``fn`` needs above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak / 2**20
    if not _reset_cpu_peak():
        return float("nan")
    base = _rss_bytes()
    out = fn()
    peak = _cpu_peak_bytes() - base
    del out
    return peak / 2**20


def seconds(fns: list[Callable[[], object]], device: torch.device, repeats: int) -> list[float]:
    """Fastest wall time of each of ``fns`` over ``repeats`` rounds, run interleaved after one warm-up round.

    Interleaving and taking the minimum keep a busy machine's load from favouring whichever model ran first.
    """
    times: list[list[float]] = [[] for _ in fns]
    for round_ in range(repeats + 1):
        for i, fn in enumerate(fns):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_:
                times[i].append(time.perf_counter() - t0)
    return [min(t) for t in times]


# ----------------------------------------------------------------------------- benchmark


def build(preset: str, device: torch.device, dtype: torch.dtype, meta: bool = False):
    """Both models with the same random weights; ``meta``: both on the meta device (for counting FLOPs)."""
    from diffusers import AutoencoderKLTemporalDecoder

    block_out_channels, layers, _, _ = PRESETS[preset]
    torch.manual_seed(0)
    with torch.device("meta") if meta else torch.device("cpu"):
        theirs = AutoencoderKLTemporalDecoder(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
            block_out_channels=block_out_channels,
            layers_per_block=layers,
            latent_channels=4,
        )
        cfg = config_from_diffusers({"_class_name": type(theirs).__name__, **theirs.config}, source="diffusers config")
        ours = VideoAutoencoder(cfg)
    if meta:
        return ours.to(dtype=dtype).eval(), theirs.to("meta", dtype).eval()
    ours.load_state_dict(from_diffusers(theirs.state_dict(), cfg), strict=True)
    return ours.to(device, dtype).eval(), theirs.to(device, dtype).eval()


def make_cases(ours, theirs, video: torch.Tensor, z: torch.Tensor, args: argparse.Namespace) -> list:
    """``(name, vdiff call, diffusers call)`` of every case, on these models and inputs."""
    flat, z_flat, t = video.flatten(0, 1), z.flatten(0, 1), video.shape[1]

    def theirs_chunked():  # the SVD pipeline's decode_chunk_size loop: chunks of frames, no overlap
        return torch.cat([theirs.decode(c, num_frames=c.shape[0]).sample for clip in z for c in clip.split(args.chunk)])

    return [
        ("encode", lambda: ours.encode(video).mean, lambda: theirs.encode(flat).latent_dist.mean),
        ("decode full", lambda: ours.decode(z), lambda: theirs.decode(z_flat, num_frames=t).sample),
        (f"decode chunk {args.chunk}, no overlap", lambda: ours.decode(z, chunk_size=args.chunk, overlap=0), theirs_chunked),
        (f"decode chunk {args.chunk}, vdiff overlap {args.overlap}",
         lambda: ours.decode(z, chunk_size=args.chunk, overlap=args.overlap), theirs_chunked),
    ]  # fmt: skip


def count_flops(fn: Callable[[], object]) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return counter.get_total_flops()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(PRESETS), default="small")
    parser.add_argument("--quick", action="store_true", help="tiny config, 2 repeats")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    add_size_argument(parser, None, "frame size (default per config)")
    parser.add_argument("--frames", type=int, help="frames per clip (default per config)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=4, help="frames per decode chunk")
    parser.add_argument("--overlap", type=int, default=1, help="frames shared by vdiff's decode chunks")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (fastest is reported)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.device == "cpu" and sys.platform == "linux" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # Serve every allocation over 64 KiB with mmap so freed tensors leave the RSS at once; otherwise glibc
        # keeps freed heap pages and the RSS high-water mark of a later call under-counts its needs.
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    if args.quick:
        args.config, args.repeats = "tiny", 3
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    _, _, (h, w), frames = PRESETS[args.config]
    if args.size:
        h, w = args.size
    frames = args.frames or frames
    b, t = args.batch, frames

    ours, theirs = build(args.config, device, dtype)
    video = (torch.rand(b, t, 3, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device, dtype)
    flat = video.flatten(0, 1)

    with torch.inference_mode():
        z = ours.encode(video).mode().contiguous()  # (B, T, 4, h/8, w/8)
        z_flat = z.flatten(0, 1).contiguous()
        enc_diff = (z_flat - theirs.encode(flat).latent_dist.mode()).abs().max().item()
        dec_diff = (ours.decode(z).flatten(0, 1) - theirs.decode(z_flat, num_frames=t).sample).abs().max().item()
        cases = make_cases(ours, theirs, video, z, args)
    # FLOPs of every case, on meta copies of both models (no compute).
    meta_ours, meta_theirs = build(args.config, device, dtype, meta=True)
    meta_cases = make_cases(meta_ours, meta_theirs, video.to("meta"), z.to("meta"), args)
    flops = [(count_flops(o), count_flops(d)) for _, o, d in meta_cases]
    rate = matmul_rate(device, dtype)
    with torch.inference_mode():
        rows = []
        for name, ours_fn, theirs_fn in cases:
            print(f"# measuring {name} ...", file=sys.stderr, flush=True)
            mem_o, mem_t = peak_memory(ours_fn, device), peak_memory(theirs_fn, device)
            sec_o, sec_t = seconds([ours_fn, theirs_fn], device, args.repeats)
            rows.append((name, b * t / sec_o, b * t / sec_t, mem_o, mem_t, sec_o, sec_t))

    print(
        f"# autoencoder benchmark: config={args.config} {PRESETS[args.config][0]} video=({b}, {t}, 3, {h}, {w}) "
        f"{args.dtype} device={device} threads={torch.get_num_threads()} torch={torch.__version__}"
    )
    print(f"# max |ours - diffusers|: latents {enc_diff:.2e}, decoded frames {dec_diff:.2e}")
    print(f"# matmul rate measured: {rate / 1e12:.3f} TFLOP/s ({args.dtype})")
    header = (f"{'case':40s} {'vdiff f/s':>10s} {'diffusers f/s':>14s} {'speed ratio':>12s} {'vdiff MiB':>10s} "
              f"{'diffusers MiB':>14s} {'mem ratio':>10s} {'vdiff GFLOP':>12s} {'diff. GFLOP':>12s} {'vdiff MFU':>10s} {'diff. MFU':>10s}")  # fmt: skip
    print(header)
    print("-" * len(header))
    table = []
    for (name, fo, ft, mo, mt, so, st), (flo, flt) in zip(rows, flops):
        mfu_o, mfu_t = flo / so / rate, flt / st / rate
        print(
            f"{name:40s} {fo:10.2f} {ft:14.2f} {fo / ft:12.2f} {mo:10.1f} {mt:14.1f} {mo / mt:10.2f} "
            f"{flo / 1e9:12.1f} {flt / 1e9:12.1f} {100 * mfu_o:9.1f}% {100 * mfu_t:9.1f}%"
        )
        table.append({"case": name, "vdiff_fps": fo, "diffusers_fps": ft, "speed_ratio": fo / ft, "vdiff_mib": mo,
                      "diffusers_mib": mt, "vdiff_flops": flo, "diffusers_flops": flt, "vdiff_mfu": mfu_o,
                      "diffusers_mfu": mfu_t})  # fmt: skip
    if args.json:
        where = (
            f"cpu ({torch.get_num_threads()} threads)" if device.type == "cpu" else torch.cuda.get_device_name(device)
        )
        with open(args.json, "w") as f:
            json.dump({"benchmark": "autoencoder", "device": where, "dtype": args.dtype, "config": args.config,
                       "video": [b, t, 3, h, w], "chunk": args.chunk, "overlap": args.overlap,
                       "matmul_tflops": rate / 1e12, "rows": table}, f, indent=1)  # fmt: skip
    full_mem = rows[1][3]
    print(
        f"# vdiff chunked decode peak memory = {rows[2][3] / full_mem:.2f} x full decode without overlap, "
        f"{rows[3][3] / full_mem:.2f} x with overlap {args.overlap} (chunk {args.chunk}, {t} frames); "
        f"diffusers chunked = {rows[2][4] / rows[1][4]:.2f} x its full decode"
    )
    print(
        f"# overlap {args.overlap} decodes windows starting at {window_starts(t, args.chunk, args.overlap)}: "
        "extra frames cost time, not memory"
    )
    print("# speed ratio > 1: vdiff faster; mem ratio < 1: vdiff needs less memory")


if __name__ == "__main__":
    main()
