"""Training-step time and peak memory of vdiff's UNet-SVD beside diffusers' UNetSpatioTemporalConditionModel at the
same config, with the same weights.

Both models are built from one ``UNetSVDConfig`` (diffusers' through ``config_to_diffusers``, with diffusers'
GroupNorm epsilons) and hold the same values (ours converted with ``to_diffusers``); the script checks that their
outputs agree before timing. Each step is forward + backward + AdamW (the same fused kernel for both) on the same
input (SVD's conditioning: a context of one token, the concatenated conditioning latent, three added time ids)
and the same loss (MSE to a fixed target), in the same precision: ``--dtype bfloat16`` is autocast over float32
weights, as Lightning's ``bf16-mixed``. Steps alternate between the models so that load on a shared machine hits
both alike.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (no compute) for each
model's forward; a training step is taken as 3x that. MFU = step FLOPs / step time / the matmul rate measured in
the same run (a square matmul in the run's dtype). vdiff's count is lower than diffusers' for the same output:
diffusers projects the cross-attention context to keys/values once per frame (spatial) and once per position
(temporal), vdiff once per clip.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during one step minus the memory held before it (weights,
gradients and optimizer state excluded, so it measures activations and workspace); on CPU the same quantity from
resident-set size, sampled every millisecond by a thread, after ``malloc_trim``.

    python benchmarks/unet_step.py                      # small CPU config
    python benchmarks/unet_step.py --quick              # tiny smoke run
    python benchmarks/unet_step.py --device cuda --dtype bfloat16 --model svd --batch 1 --frames 14 --size 32 64
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

from vdiff.models.unet_svd import UNET_SVD_CONFIGS, UNetSVD, UNetSVDConfig
from vdiff.weights.unet_svd import config_to_diffusers, to_diffusers

# "small" is a benchmark-only CPU size: SVD's block pattern (attention at every level but the last; one token of
# 1024-d context, SVD's) at a width where a step takes a few seconds on one CPU core.
PRESETS = {
    "small": UNetSVDConfig(
        model_channels=64,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_levels=(0, 1),
        head_dim=32,
        added_time_embed_dim=64,
    ),
    **UNET_SVD_CONFIGS,
}


@dataclass
class Workload:
    batch: int
    frames: int
    height: int
    width: int
    tokens: int = 1


def build_ours(config: UNetSVDConfig, checkpointing: bool) -> UNetSVD:
    torch.manual_seed(0)
    model = UNetSVD(config.replace(norm_eps="diffusers", gradient_checkpointing=checkpointing))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random values everywhere (the zero-initialised layers too): a representative step
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.1 if p.ndim == 1 else 0.02))
    return model


def build_diffusers(ours: UNetSVD | None, config: UNetSVDConfig, checkpointing: bool) -> nn.Module:
    from diffusers import UNetSpatioTemporalConditionModel  # a benchmark-only peer; never imported by vdiff itself

    config = config.replace(norm_eps="diffusers")
    kwargs = {k: v for k, v in config_to_diffusers(config).items() if not k.startswith("_")}
    model = UNetSpatioTemporalConditionModel(**kwargs)
    if ours is not None:
        model.load_state_dict(to_diffusers(ours.state_dict(), config), strict=True)
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model


def make_inputs(config: UNetSVDConfig, work: Workload, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    c = config.in_channels - config.concat_channels
    shape = (work.batch, work.frames, c, work.height, work.width)
    inputs = {
        "x": torch.randn(shape, generator=g),  # (B, T, C, H, W)
        "concat": torch.randn(work.batch, work.frames, config.concat_channels, work.height, work.width, generator=g),
        "t": torch.randn(work.batch, generator=g),  # (B,) c_noise
        "context": torch.randn(work.batch, work.tokens, config.context_dim, generator=g),
        "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]]).repeat(work.batch, 1)
        if config.num_added_time_ids == 3
        else torch.randn(work.batch, config.num_added_time_ids, generator=g),
        "target": torch.randn((work.batch, work.frames, config.out_channels, work.height, work.width), generator=g),
    }
    return {k: v.to(device) for k, v in inputs.items()}


def run_ours(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    cond = {"context": inputs["context"], "concat": inputs["concat"], "added_time_ids": inputs["added_time_ids"]}
    return model(inputs["x"], inputs["t"], cond)  # (B, T, C_out, H, W)


def run_diffusers(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    sample = torch.cat([inputs["x"], inputs["concat"]], dim=2)  # (B, T, C_in, H, W)
    return model(sample, inputs["t"], inputs["context"], inputs["added_time_ids"], return_dict=False)[0]


def forward_flops(build, runner, config: UNetSVDConfig, work: Workload) -> int:
    """Forward FLOPs of ``build()`` at the workload's input, counted on the meta device (no compute)."""
    with torch.device("meta"):
        model = build().to(
            "meta"
        )  # diffusers makes its mix factors with torch.Tensor([...]), which ignores the context
    inputs = {k: torch.empty_like(v, device="meta") for k, v in make_inputs(config, work, torch.device("cpu")).items()}
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        runner(model, inputs)
    return counter.get_total_flops()


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a square matmul in ``dtype`` on ``device`` (the best of several)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(10 if device.type == "cuda" else 5):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


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
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5, fused=True)  # same fused kernel for both
        self.times: list[float] = []
        self.cpu_times: list[float] = []  # process CPU time: robust to other load on a shared CPU machine
        self.params = sum(p.numel() for p in self.model.parameters())

    def step(self) -> float:
        synchronize(self.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = self.runner(self.model, self.inputs)  # (B, T, C_out, H, W)
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
    parser.add_argument("--model", choices=sorted(PRESETS), default=None, help="default: small on CPU, svd on CUDA")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model (default 5 on CPU, 10 on CUDA)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny model and input, 3 steps: a smoke run")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--size", type=int, nargs="+", default=None, help="latent H [W]")
    parser.add_argument("--tokens", type=int, default=1, help="context tokens (SVD: 1)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing in both models")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--skip-check", action="store_true", help="do not compare the two models' outputs first")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    name = "tiny" if args.quick else (args.model or ("small" if device.type == "cpu" else "svd"))
    config = PRESETS[name]
    if args.quick:
        defaults = (1, 4, 16, 16)
    elif device.type == "cpu":
        defaults = (1, 8, 32, 32)
    else:
        defaults = (1, 14, 72, 128)  # SVD at 576x1024, 14 frames
    size = args.size or defaults[2:]
    work = Workload(args.batch or defaults[0], args.frames or defaults[1], size[0], size[-1], args.tokens)
    steps = args.steps or (3 if args.quick else 5 if device.type == "cpu" else 10)

    ours_model = build_ours(config, args.checkpointing)
    peer_model = build_diffusers(ours_model, config, args.checkpointing)
    inputs = make_inputs(config, work, device)
    if not args.skip_check:
        with torch.no_grad():
            a = run_ours(ours_model.to(device).eval(), inputs).float()
            b = run_diffusers(peer_model.to(device).eval(), inputs).float()
        check = f"outputs agree before timing: max abs diff {(a - b).abs().max().item():.2e} (output max {b.abs().max().item():.2f})"
        del a, b
    else:
        check = "output check skipped"

    our_flops = forward_flops(lambda: build_ours(config, False), run_ours, config, work)
    peer_flops = forward_flops(lambda: build_diffusers(None, config, False), run_diffusers, config, work)
    rate = matmul_rate(device, dtype)

    ours = Trainer(f"vdiff UNetSVD ({name})", ours_model, run_ours, inputs, device, dtype)
    peer = Trainer("diffusers UNetSpatioTemporalConditionModel", peer_model, run_diffusers, inputs, device, dtype)
    for _ in range(args.warmup):
        ours.step(), peer.step()
    for _ in range(steps):  # alternate, so machine load drifts hit both alike
        for t in (ours, peer):
            t.times.append(t.step())
            t.cpu_times.append(t.last_cpu_time)
    memory = {t.name: t.peak_memory() for t in (ours, peer)}
    flops = {ours.name: our_flops, peer.name: peer_flops}

    where = (
        f"{args.device} ({torch.get_num_threads()} threads)"
        if device.type == "cpu"
        else torch.cuda.get_device_name(device)
    )
    print(
        f"device {where} | dtype {args.dtype} | config {name} (model_channels {config.model_channels}, channel_mult "
        f"{config.channel_mult}, {config.num_res_blocks} res blocks, attention at levels {config.attention_levels}) | "
        f"input (B, T, C, H, W) = ({work.batch}, {work.frames}, {config.in_channels - config.concat_channels}, "
        f"{work.height}, {work.width}) + concat {config.concat_channels} ch, context {work.tokens} token(s) | "
        f"{steps} timed steps after {args.warmup} warm-up | checkpointing {args.checkpointing}"
    )
    print(check)
    print(f"matmul rate measured: {rate / 1e12:.3f} TFLOP/s ({args.dtype})")
    header = (
        f"{'model':<46} {'params':>9} {'fwd GFLOP':>10} {'median ms':>10} {'mean ms':>9} {'CPU ms':>8} "
        f"{'peak MiB':>9} {'MFU':>6}"
    )
    print(header)
    print("-" * len(header))
    rows = {}
    for key, t in (("ours", ours), ("peer", peer)):
        median = statistics.median(t.times)
        mfu = 3 * flops[t.name] / median / rate
        rows[key] = {
            "name": t.name,
            "params": t.params,
            "fwd_flops": flops[t.name],
            "median_ms": 1e3 * median,
            "cpu_ms": 1e3 * statistics.median(t.cpu_times),
            "peak_mib": memory[t.name] / 2**20,
            "mfu": mfu,
        }
        print(
            f"{t.name:<46} {t.params / 1e6:>8.2f}M {flops[t.name] / 1e9:>10.2f} {1e3 * median:>10.1f} "
            f"{1e3 * statistics.mean(t.times):>9.1f} {1e3 * statistics.median(t.cpu_times):>8.1f} "
            f"{memory[t.name] / 2**20:>9.1f} {100 * mfu:>5.1f}%"
        )
    ratio = statistics.median(peer.times) / statistics.median(ours.times)
    cpu_ratio = statistics.median(peer.cpu_times) / statistics.median(ours.cpu_times)
    print(f"step time ratio diffusers/ours (median): {ratio:.2f} wall, {cpu_ratio:.2f} CPU time  (target >= 1.0)")
    print(f"peak memory ratio diffusers/ours: {memory[peer.name] / max(memory[ours.name], 1):.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "unet_step", "device": where, "dtype": args.dtype, "model": name,
                       "checkpointing": args.checkpointing,
                       "input": [work.batch, work.frames, config.in_channels - config.concat_channels, work.height, work.width],
                       "matmul_tflops": rate / 1e12, "check": check, "ours": rows["ours"], "peer": rows["peer"],
                       "time_ratio": ratio, "cpu_time_ratio": cpu_ratio,
                       "memory_ratio": memory[peer.name] / max(memory[ours.name], 1)}, f, indent=1)  # fmt: skip
    if args.quick:
        print(
            "(--quick is a smoke run: at this size per-op overhead, not FLOPs, sets the time; compare ratios from a full run)"
        )


if __name__ == "__main__":
    main()
