"""Training-step time and peak memory of vdiff's VDT beside diffusers' LatteTransformer3DModel at matched FLOPs.

Latte's layers carry two feed-forwards (one after spatial, one after temporal attention) to VDT's one,
so equal width and depth would not be a fair race. The script counts forward FLOPs of both models with
``torch.utils.flop_counter.FlopCounterMode`` (on the meta device, so counting costs no compute), picks
Latte's depth and width (same head dim as ours) so that its forward FLOPs are within 5% of ours at the
same input, then times forward + backward + AdamW steps of both in one run, alternating step by step so
that load on a shared machine hits both alike. Both get the same input values, the same loss (MSE to a
fixed target) and the same precision: ``--dtype bfloat16`` means autocast over float32 weights, as
Lightning's ``bf16-mixed``.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during one step minus the memory held before it
(weights, gradients and optimizer state excluded, so it measures activations and workspace); on CPU the
same quantity from resident-set size, sampled every millisecond by a thread, after ``malloc_trim``.

FLOPs and MFU: a training step counts as 3x the counted forward FLOPs; MFU = step FLOPs / median step time /
the matmul rate measured in the same run (a square matmul in the run's dtype: 8192^3 on CUDA, 1024^3 on CPU).
On CPU the process CPU time per step is printed too (steadier than wall time on a shared machine).
``--compile`` compiles every transformer block of both models in place (vdiff: ``vdiff.lit.scaling.compile_blocks``,
what ``Scaling(compile=True)`` does; Latte: its spatial and temporal blocks); warm-up steps absorb compilation.
``--json PATH`` also writes the figures as JSON (``benchmarks/gpu_suite.sh`` collects them).

    python benchmarks/vdt_step.py --device cpu --quick
    python benchmarks/vdt_step.py --device cuda --dtype bfloat16 --model VDT-B/2
    python benchmarks/vdt_step.py --device cuda --dtype bfloat16 --model VDT-L/2 --batch 8 --frames 16 --size 16  # Cityscapes
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import threading
import time
from dataclasses import dataclass

import psutil
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from unet_step import matmul_rate  # benchmarks/ is the script's folder, hence on sys.path

from vdiff.models.vdt import VDT, VDT_CONFIGS, VDTConfig

CAPTION_CHANNELS = 32  # Latte requires a caption projection; its input is a single tiny token here


@dataclass
class Workload:
    batch: int
    frames: int
    channels: int
    size: int  # latent height = width


def build_ours(args: argparse.Namespace, work: Workload) -> VDT:
    config = VDTConfig(
        input_size=work.size,
        patch_size=args.patch,
        in_channels=work.channels,
        learn_sigma=True,
        hidden_size=args.hidden,
        depth=args.depth,
        num_heads=args.heads,
        num_frames=work.frames,
        gradient_checkpointing=args.checkpointing,
    )
    return VDT(config)


def build_latte(args: argparse.Namespace, work: Workload, heads: int, layers: int, head_dim: int) -> nn.Module:
    from diffusers import LatteTransformer3DModel  # a test-only peer; never imported by vdiff itself

    model = LatteTransformer3DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=work.channels,
        out_channels=2 * work.channels,  # learned sigma, as VDT
        num_layers=layers,
        patch_size=args.patch,
        sample_size=work.size,
        activation_fn="gelu-approximate",  # VDT's MLP activation
        norm_type="ada_norm_single",
        num_embeds_ada_norm=1000,
        caption_channels=CAPTION_CHANNELS,
        video_length=work.frames,
        attention_bias=True,  # VDT's qkv have biases
    )
    if args.checkpointing:
        model.enable_gradient_checkpointing()
    return model


def make_inputs(work: Workload, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shape = (work.batch, work.frames, work.channels, work.size, work.size)
    return {
        "x": torch.randn(shape, generator=gen).to(device),  # (B, T, C, H, W)
        "t": torch.randint(0, 1000, (work.batch,), generator=gen).to(device),  # (B,)
        "caption": torch.randn(work.batch, 1, CAPTION_CHANNELS, generator=gen).to(device),
        "target": torch.randn((work.batch, work.frames, 2 * work.channels, work.size, work.size), generator=gen).to(
            device
        ),
    }


def run_ours(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(inputs["x"], inputs["t"].float())  # (B, T, 2C, H, W)


def run_latte(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(
        inputs["x"].permute(0, 2, 1, 3, 4),
        timestep=inputs["t"],
        encoder_hidden_states=inputs["caption"],
        return_dict=False,
    )[0]
    return out.permute(0, 2, 1, 3, 4)  # (B, T, 2C, H, W)


def forward_flops(build, runner, work: Workload) -> int:
    """Forward FLOPs of the model ``build()`` makes, at the workload's input, counted on the meta device
    (no compute)."""
    with torch.device("meta"):
        model = build()
    inputs = {k: torch.empty_like(v, device="meta") for k, v in make_inputs(work, torch.device("cpu")).items()}
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        runner(model, inputs)
    return counter.get_total_flops()


def match_latte(args: argparse.Namespace, work: Workload, target: int) -> tuple[int, int, int, int]:
    """Latte (heads, head_dim, layers, flops) whose forward FLOPs are within 5% of ``target``, preferring our
    head dim and the width nearest ours; when no head count at our head dim gets within 5% (small models:
    one layer is a coarse step), the head dim varies too. FLOPs are affine in the layer count, so two
    counts per width suffice."""
    head_dim = args.hidden // args.heads

    def candidates(shapes):
        found = []
        for heads, dim in shapes:
            one = forward_flops(lambda h=heads, d=dim: build_latte(args, work, h, 1, d), run_latte, work)
            two = forward_flops(lambda h=heads, d=dim: build_latte(args, work, h, 2, d), run_latte, work)
            per_layer, base = two - one, 2 * one - two
            layers = max(1, round((target - base) / per_layer))
            flops = base + layers * per_layer
            found.append((abs(flops - target) / target, abs(heads * dim - args.hidden), heads, dim, layers, flops))
        return found

    found = candidates([(h, head_dim) for h in range(max(1, args.heads // 2), 2 * args.heads + 1)])
    if not any(c[0] <= 0.05 for c in found):
        found += candidates(
            [(args.heads, d) for d in range(max(2, head_dim // 2), 2 * head_dim + 1, 2) if d != head_dim]
        )
    close = [c for c in found if c[0] <= 0.05]
    best = min(close, key=lambda c: (c[1], c[0])) if close else min(found)
    return best[2], best[3], best[4], best[5]


class PeakRss:
    """Peak resident-set size above the level at entry, sampled every millisecond by a thread."""

    def __enter__(self) -> PeakRss:
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back so the baseline is honest
        except OSError:
            pass
        self._process = psutil.Process()
        self.baseline = self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def delta(self) -> int:
        return self.peak - self.baseline


class Trainer:
    """One model, its AdamW and a timed training step."""

    def __init__(
        self, name: str, model: nn.Module, runner, inputs: dict, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.name, self.model, self.runner, self.inputs = name, model.to(device).train(), runner, inputs
        self.device, self.dtype = device, dtype
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)  # same fused kernel for both
        self.times: list[float] = []
        self.cpu_times: list[float] = []  # process CPU time: robust to other load on a shared CPU machine
        self.params = sum(p.numel() for p in self.model.parameters())

    def step(self) -> float:
        synchronize(self.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = self.runner(self.model, self.inputs)  # (B, T, 2C, H, W)
        loss = (out.float() - self.inputs["target"]).square().mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)
        self.last_cpu_time = time.process_time() - cpu_start
        return time.perf_counter() - start

    def peak_memory(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.step()
            return torch.cuda.max_memory_allocated(self.device) - before
        with PeakRss() as rss:
            self.step()
        return rss.delta


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model (default 5 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny model and input, 3 steps: a smoke run")
    parser.add_argument(
        "--model",
        choices=["small", "VDT-S/2", "VDT-B/2", "VDT-L/2"],
        default=None,
        help="default: small on CPU, VDT-B/2 on CUDA",
    )
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--size", type=int, default=None, help="latent side length")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing in both models")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--compile", action="store_true", help="torch.compile every block of both models (in place)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    # The named sizes are vdiff's own (VDT_CONFIGS); "tiny" and "small" are benchmark-only CPU sizes.
    presets = {
        "tiny": VDTConfig(hidden_size=64, depth=2, num_heads=2),
        "small": VDTConfig(hidden_size=192, depth=6, num_heads=3),
        **VDT_CONFIGS,
    }
    name = "tiny" if args.quick else (args.model or ("small" if device.type == "cpu" else "VDT-B/2"))
    preset = presets[name]
    args.hidden, args.depth, args.heads, args.patch = (
        preset.hidden_size,
        preset.depth,
        preset.num_heads,
        preset.patch_size,
    )
    cpu_defaults = (1, 4, 8) if args.quick else (2, 8, 16)
    batch, frames, size = cpu_defaults if device.type == "cpu" or args.quick else (4, 16, 32)
    work = Workload(args.batch or batch, args.frames or frames, args.channels, args.size or size)
    steps = args.steps or (3 if args.quick else 5 if device.type == "cpu" else 20)

    our_flops = forward_flops(lambda: build_ours(args, work), run_ours, work)
    heads, head_dim, layers, latte_flops = match_latte(args, work, our_flops)
    torch.manual_seed(0)
    inputs = make_inputs(work, device)
    our_model, peer_model = build_ours(args, work), build_latte(args, work, heads, layers, head_dim)
    if args.compile:
        from vdiff.lit.scaling import compile_blocks

        compile_blocks(our_model)
        for block in [*peer_model.transformer_blocks, *peer_model.temporal_transformer_blocks]:
            block.compile()
    ours = Trainer(
        f"vdiff VDT ({name}: D={args.hidden}, depth {args.depth}, {args.heads} heads)",
        our_model,
        run_ours,
        inputs,
        device,
        dtype,
    )
    peer = Trainer(
        f"diffusers Latte (D={heads * head_dim}, {layers} layers x 2 blocks, {heads} heads)",
        peer_model,
        run_latte,
        inputs,
        device,
        dtype,
    )
    rate = matmul_rate(device, dtype)

    for _ in range(args.warmup):
        ours.step(), peer.step()
    for _ in range(steps):  # alternate, so machine load drifts hit both alike
        for t in (ours, peer):
            t.times.append(t.step())
            t.cpu_times.append(t.last_cpu_time)
    memory = {t.name: t.peak_memory() for t in (ours, peer)}
    flops = {ours.name: our_flops, peer.name: latte_flops}

    print(
        f"device {args.device} ({torch.get_num_threads()} threads)"
        if device.type == "cpu"
        else f"device {torch.cuda.get_device_name(device)}",
        f"| dtype {args.dtype} | input (B, T, C, H, W) = ({work.batch}, {work.frames}, {work.channels}, {work.size}, {work.size}), patch {args.patch}"
        f" | {steps} timed steps after {args.warmup} warm-up | checkpointing {args.checkpointing} | compile {args.compile}",
    )
    print(
        f"forward FLOPs: ours {our_flops / 1e9:.3f} G, Latte {latte_flops / 1e9:.3f} G (Latte/ours {latte_flops / our_flops:.3f})"
    )
    print(f"matmul rate measured: {rate / 1e12:.3f} TFLOP/s ({args.dtype}); a step counts 3x the forward FLOPs")
    header = f"{'model':<62} {'params':>9} {'median ms':>10} {'mean ms':>9} {'CPU ms':>8} {'peak MiB':>9} {'TFLOP/s':>8} {'MFU':>6}"
    print(header)
    print("-" * len(header))
    rows = {}
    for key, t in (("ours", ours), ("peer", peer)):
        median = statistics.median(t.times)
        achieved = 3 * flops[t.name] / median
        rows[key] = {
            "name": t.name,
            "params": t.params,
            "fwd_flops": flops[t.name],
            "median_ms": 1e3 * median,
            "mean_ms": 1e3 * statistics.mean(t.times),
            "cpu_ms": 1e3 * statistics.median(t.cpu_times),
            "peak_mib": memory[t.name] / 2**20,
            "tflops": achieved / 1e12,
            "mfu": achieved / rate,
        }
        r = rows[key]
        print(
            f"{t.name:<62} {t.params / 1e6:>8.2f}M {r['median_ms']:>10.1f} {r['mean_ms']:>9.1f} {r['cpu_ms']:>8.1f} {r['peak_mib']:>9.1f} "
            f"{r['tflops']:>8.3f} {100 * r['mfu']:>5.1f}%"
        )
    ratio = statistics.median(peer.times) / statistics.median(ours.times)
    cpu_ratio = statistics.median(peer.cpu_times) / statistics.median(ours.cpu_times)
    print(
        f"step time ratio Latte/ours (median): {ratio:.2f} wall, {cpu_ratio:.2f} CPU time  (target >= 1.0 on CPU, >= 1.3 in bf16 on GPU)"
    )
    print(f"peak memory ratio Latte/ours: {memory[peer.name] / max(memory[ours.name], 1):.2f}")
    if args.json:
        where = (
            f"cpu ({torch.get_num_threads()} threads)" if device.type == "cpu" else torch.cuda.get_device_name(device)
        )
        payload = {
            "benchmark": "vdt_step",
            "device": where,
            "dtype": args.dtype,
            "model": name,
            "compile": args.compile,
            "checkpointing": args.checkpointing,
            "input": [work.batch, work.frames, work.channels, work.size, work.size],
            "matmul_tflops": rate / 1e12,
            "ours": rows["ours"],
            "peer": rows["peer"],
            "time_ratio": ratio,
            "cpu_time_ratio": cpu_ratio,
            "memory_ratio": memory[peer.name] / max(memory[ours.name], 1),
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    if args.quick:
        print(
            "(--quick is a smoke run: at this size per-op overhead, not FLOPs, sets the time; compare ratios from a full run)"
        )


if __name__ == "__main__":
    main()
