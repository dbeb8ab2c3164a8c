"""Accelerator utilisation during a short real training run: does the data pipeline keep the GPU busy?

Writes latent shards at the VDT Cityscapes setup (30-frame samples of 4x16x16 SD-VAE latents, as ``vdiff encode``
writes them), then trains ``VDTModule`` (VDT-L/2 by default) on them through a real ``lightning.Trainer``:
``LatentDataModule`` with ``--workers`` DataLoader workers (default ``auto``: cores per GPU less one), 16-frame
clips, batch 8, bf16-mixed, the EMA callback, no validation. While it trains, ``nvidia-smi`` is polled every
100 ms for the GPU's utilisation (the share of time a kernel was running) and memory; the first ``--skip``
steps (start-up, cuDNN/cuBLAS autotuning) are left out. Reported: mean and median utilisation, step time and
samples/s over the measured steps. Utilisation near 100% means the input pipeline keeps up; a data-bound run
shows gaps.

On CPU (``--quick``: VDT-S/2-sized tiny model, a few steps) there is no GPU to poll; the process's CPU
utilisation is reported instead (a smoke run of the code path).

    python benchmarks/gpu_util.py --device cuda --steps 80
    python benchmarks/gpu_util.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import lightning as L
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dataloader import LATENT_CLIP, write_latent_shards  # noqa: E402

from vdiff.callbacks.ema import EMA  # noqa: E402
from vdiff.data.latent_datamodule import LatentDataModule  # noqa: E402
from vdiff.diffusion.ddpm import GaussianDiffusion  # noqa: E402
from vdiff.lit.optim import OptimizerSettings  # noqa: E402
from vdiff.lit.vdt import VDTModule  # noqa: E402
from vdiff.models.autoencoder import AutoencoderConfig, VideoAutoencoder  # noqa: E402
from vdiff.models.vdt import VDTConfig  # noqa: E402


class Poller:
    """Samples GPU utilisation (%) and memory (MiB) with nvidia-smi, or this process's CPU %, every 100 ms."""

    def __init__(self, gpu_index: int | None) -> None:
        self.gpu_index, self.samples, self._stop = gpu_index, [], threading.Event()
        self.recording = False
        self._process = psutil.Process()
        self._process.cpu_percent()  # the first reading is 0 by definition

    def _read(self) -> tuple[float, float] | None:
        if self.gpu_index is None:
            return self._process.cpu_percent(), self._process.memory_info().rss / 2**20
        out = subprocess.run(
            ["nvidia-smi", f"--id={self.gpu_index}", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=5,
        )  # fmt: skip
        if out.returncode != 0:
            return None
        util, memory = (float(v) for v in out.stdout.strip().split(","))
        return util, memory

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self._read()
            if value is not None and self.recording:
                self.samples.append(value)
            time.sleep(0.1)

    def __enter__(self) -> Poller:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class StepClock(L.Callback):
    """Starts the poller's recording after ``skip`` steps and times the steps after that."""

    def __init__(self, poller: Poller, skip: int) -> None:
        self.poller, self.skip, self.times, self._start = poller, skip, [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.skip:
            self.poller.recording = True
            if self._start is None:
                self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is not None:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
            now = time.perf_counter()
            self.times.append(now - self._start)
            self._start = now

    def on_train_end(self, trainer, pl_module) -> None:
        self.poller.recording = False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", default="VDT-L/2", help="a VDT size name (VDT-S/2, VDT-B/2, VDT-L/2)")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--skip", type=int, default=20, help="steps left out of the measurement (start-up)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", default="auto", help="DataLoader workers per rank, or auto")
    parser.add_argument("--samples", type=int, default=1024, help="latent samples written")
    parser.add_argument("--quick", action="store_true", help="tiny VDT on CPU, a few steps (smoke run)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.quick:
        args.device, args.steps, args.skip, args.samples, args.workers = "cpu", 6, 2, 64, "0"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if device.type == "cuda" and shutil.which("nvidia-smi") is None:
        raise SystemExit("nvidia-smi not found: cannot read GPU utilisation")

    root = Path(tempfile.mkdtemp(prefix="vdiff-gpu-util-"))
    spec = write_latent_shards(root / "latents", args.samples)
    workers = args.workers if args.workers == "auto" else int(args.workers)
    data = LatentDataModule(train=spec, num_frames=LATENT_CLIP, batch_size=args.batch, num_workers=workers,
                            epoch_length=args.steps + 10, shuffle_buffer=64)  # fmt: skip
    # Latents have 4 channels: a (never used) 4-channel autoencoder sets the network's input channels.
    autoencoder = VideoAutoencoder(AutoencoderConfig.from_name("tiny", z_channels=4))
    net = (
        VDTConfig(hidden_size=64, depth=2, num_heads=2, input_size=16)
        if args.quick
        else VDTConfig.from_name(args.model, input_size=16)
    )
    torch.manual_seed(0)
    module = VDTModule(net=net, autoencoder=autoencoder, diffusion=GaussianDiffusion(learn_sigma=True, prediction="eps"),
                       mask_weights={"prediction": 1.0, "interpolation": 1.0},
                       optimizer=OptimizerSettings(lr=1e-4))  # fmt: skip
    index = (device.index or 0) if device.type == "cuda" else None
    with Poller(index) as poller:
        clock = StepClock(poller, args.skip)
        trainer = L.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision="bf16-mixed",
            max_steps=args.steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[EMA(decay=0.9999), clock],
            default_root_dir=str(root),
        )  # fmt: skip
        trainer.fit(module, datamodule=data)
    shutil.rmtree(root, ignore_errors=True)

    util = [u for u, _ in poller.samples]
    memory = [m for _, m in poller.samples]
    what = "GPU utilisation" if device.type == "cuda" else "process CPU utilisation (no GPU)"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    step = statistics.median(clock.times) if clock.times else float("nan")
    result = {
        "benchmark": "gpu_util", "device": where, "model": "tiny" if args.quick else args.model, "batch": args.batch,
        "workers": data.num_workers, "measured_steps": len(clock.times), "samples": len(util),
        "util_mean": statistics.mean(util) if util else float("nan"),
        "util_median": statistics.median(util) if util else float("nan"),
        "memory_max_mib": max(memory) if memory else float("nan"), "step_ms": 1e3 * step,
        "samples_per_s": args.batch / step if clock.times else float("nan"),
    }  # fmt: skip
    print(f"device {where} | {result['model']} bf16-mixed, batch {args.batch}, LatentDataModule workers {data.num_workers} "
          f"| {len(clock.times)} steps measured after {args.skip}")  # fmt: skip
    print(f"{what}: mean {result['util_mean']:.1f}%, median {result['util_median']:.1f}% over {len(util)} samples; "
          f"memory max {result['memory_max_mib']:.0f} MiB")  # fmt: skip
    print(f"step {result['step_ms']:.1f} ms (median), {result['samples_per_s']:.1f} samples/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
