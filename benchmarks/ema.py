"""Training-step time and peak memory with vdiff's EMA (on the device, on the CPU) beside Lightning's
EMAWeightAveraging and beside no EMA at all, measured in one run.

Every variant trains the same VDT (same initial weights, same fixed batch, fused AdamW) through a real
``lightning.Trainer`` for ``--warmup`` + ``--steps`` optimizer steps with EMA decay 0.9999 updated at
every step:

* ``no EMA``;
* ``vdiff EMA, device``: :class:`vdiff.callbacks.EMA` with fp32 shadows beside the weights;
* ``vdiff EMA, cpu``: shadows in pinned host memory, the average computed by a background thread
  while the next step runs (``placement="cpu"``);
* ``Lightning EMAWeightAveraging``: ``lightning.pytorch.callbacks.EMAWeightAveraging`` (a deep copy of
  the whole LightningModule) with ``device`` set to the training device; on CUDA also with
  ``device="cpu"``. (Left at its default, Lightning puts the copy wherever the module is when the
  callback's ``setup`` runs: on the CPU for a module built there, as usual, since the strategy moves it
  to the GPU later.)

Step time (:class:`Clock`): on CUDA the wall time of the timed steps (synchronised at both ends) per
step; on CPU the median interval between step starts, so the work a background thread leaves to the
next step is counted either way. Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` over the whole fit (weights, gradients, AdamW state, activations and
whatever the EMA keeps on the GPU); on CPU the peak resident-set size above the level before the module
was built, sampled every millisecond. On CPU the process CPU time per step is printed too (all threads:
the background average counts in full); on a shared machine it is the steadier figure (one torch
thread by default: idle OpenMP threads spin and would blur it). Ratios are against ``no EMA``. A second table times swapping the
averaged weights in and out (what validation does) and the extra memory it takes: vdiff exchanges
tensors in place, Lightning's ``_swap_models`` clones each tensor.

    python benchmarks/ema.py --device cpu
    python benchmarks/ema.py --device cuda --model VDT-L/2     # target: cpu placement memory ratio <= 1.02
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import threading
import time

import lightning as L
import psutil
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import nn

from vdiff.callbacks.ema import EMA
from vdiff.models.vdt import VDT, VDT_CONFIGS, VDTConfig

DECAY = 0.9999


class Bench(L.LightningModule):
    """A VDT regressing a fixed batch (the data cost nothing); optional frozen parameters stand for a
    frozen autoencoder or image encoder (vdiff never copies them, Lightning does)."""

    def __init__(self, config: VDTConfig, shape: tuple[int, ...], frozen_millions: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = VDT(config)
        width = 1024
        layers = int(round(frozen_millions * 1e6 / (width * width))) if frozen_millions else 0
        self.frozen = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)]).requires_grad_(False)
        g = torch.Generator().manual_seed(1)
        b, t, c, h, w = shape
        self.register_buffer("x", torch.randn(shape, generator=g), persistent=False)
        self.register_buffer("t", torch.randint(0, 1000, (b,), generator=g).float(), persistent=False)
        self.register_buffer("target", torch.randn((b, t, config.out_channels, h, w), generator=g), persistent=False)

    def ema_named_parameters(self):
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad and not n.startswith("frozen.")]

    def training_step(self, batch, batch_idx):
        out = self.net(self.x, self.t)
        return (out.float() - self.target).square().mean()

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=1e-5, fused=self.device.type == "cuda")

    def train_dataloader(self):
        return torch.utils.data.DataLoader(range(10**6), batch_size=None)


class Clock(L.Callback):
    """Step times after ``warmup`` steps. CUDA: the wall time of the timed window (synchronised only at its
    ends, so copies overlapping the next step are not serialised) per step. CPU: the median of the
    intervals between consecutive step starts, wall and process CPU time (steadier on a shared machine)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.marks: list[tuple[float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx >= self.warmup:
            if batch_idx == self.warmup:
                synchronize(pl_module.device)
            self.marks.append((time.perf_counter(), time.process_time()))

    def on_train_end(self, trainer, pl_module):  # after the EMA callback's own on_train_end (it flushes)
        synchronize(pl_module.device)
        self.marks.append((time.perf_counter(), time.process_time()))

    def step_times(self, device: torch.device) -> tuple[float, float]:
        """(wall, CPU) seconds per step."""
        walls = [b[0] - a[0] for a, b in zip(self.marks, self.marks[1:])]
        cpus = [b[1] - a[1] for a, b in zip(self.marks, self.marks[1:])]
        if device.type == "cuda":
            return (self.marks[-1][0] - self.marks[0][0]) / len(walls), sum(cpus) / len(cpus)
        return statistics.median(walls), statistics.median(cpus)


class PeakRss:
    """Peak resident-set size above the level at entry, sampled every millisecond by a thread."""

    def __enter__(self) -> PeakRss:
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def variants(device: torch.device) -> dict[str, object]:
    found = {
        "no EMA": lambda: None,
        "vdiff EMA, device": lambda: EMA(decay=DECAY, warmup=False, placement="device"),
        "vdiff EMA, cpu": lambda: EMA(decay=DECAY, warmup=False, placement="cpu"),
        f"Lightning EMAWeightAveraging({device.type})": lambda: EMAWeightAveraging(decay=DECAY, device=device.type),
    }
    if device.type == "cuda":
        found["Lightning EMAWeightAveraging(cpu)"] = lambda: EMAWeightAveraging(decay=DECAY, device="cpu")
    return found


def measure_swap(callback, module: Bench, device: torch.device) -> tuple[float, int]:
    """Seconds and extra peak bytes of putting the averaged weights in and taking them out again."""

    def swap() -> None:
        if isinstance(callback, EMA):
            callback.swap_in(module)
            callback.swap_out(module)
        else:
            callback._swap_models(module)
            callback._swap_models(module)

    swap()  # warm
    synchronize(device)
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        swap()
        synchronize(device)
        return time.perf_counter() - start, torch.cuda.max_memory_allocated(device) - before
    with PeakRss() as rss:
        start = time.perf_counter()
        swap()
        seconds = time.perf_counter() - start
    return seconds, rss.delta


def run_variant(make, args, config: VDTConfig, shape, device: torch.device) -> dict:
    callback = make()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    clock = Clock(args.warmup)
    callbacks = [c for c in (callback, clock) if c is not None]
    with PeakRss() as rss:
        module = Bench(config, shape, args.frozen)
        trainer = L.Trainer(
            accelerator=device.type, devices=1, precision=args.precision, max_steps=args.warmup + args.steps,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, callbacks=callbacks,
        )  # fmt: skip
        trainer.fit(module)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss.delta
    step_s, cpu_s = clock.step_times(device)
    result = {"step_s": step_s, "cpu_s": cpu_s, "peak": peak}
    result["tracked"] = sum(p.numel() for n, p in module.ema_named_parameters())
    if callback is not None:
        result["swap_s"], result["swap_bytes"] = measure_swap(callback, module, device)
    if isinstance(callback, EMA):
        result["ema"] = {n: s.detach().cpu().clone() for n, s in callback.shadow.items()}
    del trainer, module, callback
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", choices=["tiny", "small", *VDT_CONFIGS], default=None,
                        help="default: small on CPU, VDT-L/2 on CUDA")  # fmt: skip
    parser.add_argument(
        "--precision", default=None, help="Trainer precision (default: 32-true on CPU, bf16-mixed on CUDA)"
    )
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--size", type=int, default=None, help="latent side length")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per variant (default 6 on CPU, 20 on CUDA)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--repeats", type=int, default=1, help="rounds over all variants; the median step time is reported"
    )
    parser.add_argument("--frozen", type=float, default=0.0, help="millions of frozen parameters beside the network")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 1 on CPU: waiting OpenMP threads spin and blur CPU time)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny model, 3 steps: a smoke run")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    presets = {"tiny": VDTConfig(hidden_size=64, depth=2, num_heads=2), "small": VDTConfig(hidden_size=192, depth=6, num_heads=3),
               **VDT_CONFIGS}  # fmt: skip
    name = "tiny" if args.quick else (args.model or ("small" if device.type == "cpu" else "VDT-L/2"))
    config = presets[name].replace(in_channels=4, learn_sigma=True)
    on_cuda = device.type == "cuda" and not args.quick
    batch, frames, size = (4, 16, 32) if on_cuda else (1, 4, 8) if args.quick else (2, 8, 16)
    shape = (args.batch or batch, args.frames or frames, 4, args.size or size, args.size or size)
    args.steps = args.steps or (3 if args.quick else 20 if on_cuda else 6)
    args.precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")

    run_variant(lambda: None, args, config, shape, device)  # discarded: first-use allocations and lazy imports
    results: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for label, make in variants(device).items():
            results.setdefault(label, []).append(run_variant(make, args, config, shape, device))

    where = f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    tracked = results["no EMA"][0]["tracked"]
    print(f"device {args.device} ({where}) | {name}: {tracked / 1e6:.1f}M trained parameters, {args.frozen:g}M frozen "
          f"| precision {args.precision} | input (B, T, C, H, W) = {shape} | {args.steps} timed steps after {args.warmup} "
          f"| {args.repeats} round(s) | EMA decay {DECAY}, every step")  # fmt: skip
    base_step = statistics.median(r["step_s"] for r in results["no EMA"])
    base_peak = max(r["peak"] for r in results["no EMA"])
    unit = "peak alloc MiB" if device.type == "cuda" else "peak RSS+ MiB"
    base_cpu = statistics.median(r["cpu_s"] for r in results["no EMA"])
    header = (f"{'variant':<36} {'step ms':>9} {'time ratio':>10} {'CPU ms/step':>11} {'CPU ratio':>9} {unit:>15} "
              f"{'memory ratio':>12}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for label, runs in results.items():
        step = statistics.median(r["step_s"] for r in runs)
        cpu = statistics.median(r["cpu_s"] for r in runs)
        peak = max(r["peak"] for r in runs)
        print(f"{label:<36} {1e3 * step:>9.1f} {step / base_step:>10.3f} {1e3 * cpu:>11.1f} {cpu / base_cpu:>9.3f} "
              f"{peak / 2**20:>15.1f} {peak / max(base_peak, 1):>12.3f}")  # fmt: skip
    print()
    header = f"{'swap in + out':<36} {'ms':>9} {'extra MiB':>10}"
    print(header)
    print("-" * len(header))
    for label, runs in results.items():
        if "swap_s" in runs[0]:
            swap = statistics.median(r["swap_s"] for r in runs)
            extra = max(r["swap_bytes"] for r in runs)
            print(f"{label:<36} {1e3 * swap:>9.1f} {extra / 2**20:>10.1f}")
    fp32_copy = tracked * 4 / 2**20
    print(f"\none fp32 copy of the trained parameters: {fp32_copy:.1f} MiB")
    device_ema, cpu_ema = results["vdiff EMA, device"][0]["ema"], results["vdiff EMA, cpu"][0]["ema"]
    diff = max((device_ema[n] - cpu_ema[n]).abs().max().item() for n in device_ema)
    print(f"EMA after the run, cpu vs device placement: max |difference| {diff:.3g}")
    if device.type == "cpu":
        print("(CPU: the 'cpu' placement keeps shadows and a staging copy in the same memory as the weights, and its "
              "thread shares the cores with training; the placement is meant for GPU runs)")  # fmt: skip


if __name__ == "__main__":
    main()
