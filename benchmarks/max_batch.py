"""Largest training batch that fits: vdiff's UNet-SVD with EMA beside diffusers' UNetSpatioTemporalConditionModel with
diffusers' EMAModel, at one resolution (SVD-XT: 576x1024, 25 frames), in one run.

Each side trains with what its users train with: forward + backward + fused AdamW in bf16 autocast over fp32
weights (Lightning's ``bf16-mixed``; diffusers' SVD fine-tuning scripts with ``--mixed_precision bf16``), activation
checkpointing on both (``--no-checkpointing`` to compare without), and an exponential moving average of the weights:

* vdiff: the EMA callback's placements - ``device`` (fp32 shadows beside the weights) and ``cpu`` (shadows in pinned
  host memory, averaged off the GPU: no EMA tensor on the device) - reproduced here without Lightning (the same
  tensors are allocated: one fp32 shadow per trained parameter, on the device or in pinned host memory);
* diffusers: ``diffusers.training_utils.EMAModel`` over the UNet's parameters, moved to the device (as its
  train_svd examples do).

For each side the batch grows (1, 2, 3, ...) until a step runs out of memory or ``--max-batch`` is reached; two
steps run per batch (the second with AdamW's state allocated), and the largest batch that completed is reported
with its peak memory (``torch.cuda.max_memory_allocated``) and step time. On CPU nothing runs out of memory: the
scan stops at ``--max-batch`` and the peak is the resident-set size above the level before the model was built
(a smoke run of the code path).

    python benchmarks/max_batch.py --device cuda --model svd-xt --frames 25 --size 72 128     # 576x1024x25
    python benchmarks/max_batch.py --quick                                                    # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import psutil
import torch
from unet_step import (  # benchmarks/ is the script's folder, hence on sys.path
    PRESETS,
    PeakRss,
    Workload,
    build_diffusers,
    make_inputs,
    run_diffusers,
    run_ours,
    synchronize,
)

from vdiff.models.unet_svd import UNetSVD

EMA_DECAY = 0.9999


class Side:
    """One model, its fused AdamW and its EMA."""

    def __init__(self, name: str, model: torch.nn.Module, runner, ema: str, device: torch.device) -> None:
        self.name, self.runner, self.ema_kind, self.device = name, runner, ema, device
        self.model = model.to(device).train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
        self.params = params
        if ema == "diffusers":
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(params, decay=EMA_DECAY)
            self.ema.to(device)
        elif ema == "device":
            self.shadow = [p.detach().float().clone() for p in params]
        elif ema == "cpu":
            pin = device.type == "cuda"
            self.shadow = [torch.empty(p.shape, dtype=torch.float32, pin_memory=pin) for p in params]
            for s, p in zip(self.shadow, params):
                s.copy_(p.detach())
            self.staging = [torch.empty_like(s, pin_memory=pin) for s in self.shadow]

    def step(self, inputs: dict[str, torch.Tensor]) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            out = self.runner(self.model, inputs)
        loss = (out.float() - inputs["target"]).square().mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            if self.ema_kind == "diffusers":
                self.ema.step(self.params)
            elif self.ema_kind == "device":
                torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1 - EMA_DECAY)
            elif self.ema_kind == "cpu":  # vdiff's placement="cpu": copy to pinned host memory, average there
                for buf, p in zip(self.staging, self.params):
                    buf.copy_(p.detach(), non_blocking=True)
                synchronize(self.device)
                torch._foreach_lerp_(self.shadow, self.staging, 1 - EMA_DECAY)


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def scan(build, args: argparse.Namespace, config, device: torch.device) -> dict:
    """The largest batch one side trains at, its peak memory and step time."""
    side = build()
    best: dict = {"batch": 0}
    for batch in range(1, args.max_batch + 1):
        work = Workload(batch, args.frames, args.size[0], args.size[-1])
        try:
            inputs = make_inputs(config, work, device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                side.step(inputs)
                synchronize(device)
                start = time.perf_counter()
                side.step(inputs)
                synchronize(device)
                seconds = time.perf_counter() - start
                peak = torch.cuda.max_memory_allocated(device)
            else:
                side.step(inputs)
                with PeakRss() as rss:
                    start = time.perf_counter()
                    side.step(inputs)
                    seconds = time.perf_counter() - start
                peak = rss.peak - args.baseline_rss
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not is_oom(err):
                raise
            best["stopped"] = f"out of memory at batch {batch}"
            break
        finally:
            side.optimizer.zero_grad(set_to_none=True)
            inputs = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        best = {"batch": batch, "peak_gib": peak / 2**30, "step_s": seconds}
        print(f"  {side.name}: batch {batch} ok, peak {peak / 2**30:.2f} GiB, step {seconds:.2f} s", flush=True)
    else:
        best["stopped"] = f"--max-batch {args.max_batch} reached"
    best["name"] = side.name
    del side
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", choices=sorted(PRESETS), default=None, help="default: svd-xt on CUDA, tiny on CPU")
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--size", type=int, nargs="+", default=None, help="latent H [W] (576x1024: 72 128)")
    parser.add_argument("--max-batch", type=int, default=None, help="stop the scan here (default 64 on CUDA, 2 on CPU)")
    parser.add_argument("--no-checkpointing", action="store_true", help="without activation checkpointing")
    parser.add_argument("--ema", nargs="+", default=["device", "cpu"], choices=["device", "cpu", "none"],
                        help="vdiff EMA placements to scan")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny model, small input, batches 1-2 (CPU smoke run)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    cuda = device.type == "cuda" and not args.quick
    name = "tiny" if args.quick else (args.model or ("svd-xt" if cuda else "tiny"))
    config = PRESETS[name]
    args.frames = args.frames or (25 if cuda else 4)
    args.size = args.size or ([72, 128] if cuda else [16, 16])
    args.max_batch = args.max_batch or (64 if device.type == "cuda" else 2)
    checkpointing = not args.no_checkpointing
    args.baseline_rss = psutil.Process().memory_info().rss if device.type == "cpu" else 0

    def ours(ema: str):
        def build():
            torch.manual_seed(0)
            model = UNetSVD(config.replace(gradient_checkpointing=checkpointing))
            return Side(f"vdiff UNetSVD, EMA {ema}", model, run_ours, ema, device)

        return build

    def theirs():
        return Side("diffusers UNetSpatioTemporalConditionModel, EMAModel", build_diffusers(None, config, checkpointing),
                    run_diffusers, "diffusers", device)  # fmt: skip

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {where} | config {name} | latents (B, {args.frames}, 4, {args.size[0]}, {args.size[-1]}) | bf16 autocast, "
          f"fused AdamW, activation checkpointing {checkpointing}")  # fmt: skip
    results = [scan(ours(ema), args, config, device) for ema in args.ema]
    results.append(scan(theirs, args, config, device))
    print(f"{'model':<58} {'largest batch':>13} {'peak GiB':>9} {'step s':>7}  stopped")
    for r in results:
        print(
            f"{r['name']:<58} {r['batch']:>13} {r.get('peak_gib', float('nan')):>9.2f} {r.get('step_s', float('nan')):>7.2f}  {r['stopped']}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "max_batch", "device": where, "model": name, "frames": args.frames,
                       "latent_size": args.size, "checkpointing": checkpointing, "results": results}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
