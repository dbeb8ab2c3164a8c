"""Data-parallel strategies on 2 CPU processes (gloo): DDP beside FSDP2 sharding (vdiff's ModelParallelStrategy
path: ``fully_shard`` of every VDT block, then the network), same model, same global batch, in one run.

Each rank trains a VDT (forward + backward + AdamW) on half of a fixed global batch, ``--steps`` timed steps after
warm-up, and reports: the median step time (wall and process CPU time), the bytes of model state it holds
(parameters, gradients and AdamW moments: its shards under FSDP2, everything under DDP) and its peak resident-set
size above the level before the model was built. A single process with the whole batch is the reference.
Sharding divides the model state by the number of ranks; it costs two all-gathers and a reduce-scatter per block
and step, which on CPU with gloo is pure overhead (no overlap with compute as on GPUs with NCCL).

    python benchmarks/strategies.py              # VDT D=192, 6 blocks (the vdt_step.py "small" size)
    python benchmarks/strategies.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vdiff.models.vdt import VDT, VDTConfig


def build(args: argparse.Namespace) -> VDT:
    torch.manual_seed(0)
    return VDT(VDTConfig(patch_size=2, hidden_size=args.hidden, depth=args.depth, num_heads=args.heads, in_channels=4,
                         learn_sigma=True, input_size=args.size, num_frames=args.frames))  # fmt: skip


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of parameters, gradients and optimizer state this process holds (local shards of DTensors)."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    total = 0
    for p in model.parameters():
        total += local(p).numel() * p.element_size()
        if p.grad is not None:
            total += local(p.grad).numel() * p.grad.element_size()
    for state in optimizer.state.values():
        total += sum(local(v).numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.ndim > 0)
    return total


def train(model: torch.nn.Module, args: argparse.Namespace, rank: int, world: int) -> dict:
    g = torch.Generator().manual_seed(1)
    shape = (args.batch, args.frames, 4, args.size, args.size)
    x, target = (
        torch.randn(shape, generator=g),
        torch.randn((args.batch, args.frames, 8, args.size, args.size), generator=g),
    )
    t = torch.randint(0, 1000, (args.batch,), generator=g).float()
    per = args.batch // world
    x, target, t = (
        x[rank * per : (rank + 1) * per],
        target[rank * per : (rank + 1) * per],
        t[rank * per : (rank + 1) * per],
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    process = psutil.Process()
    peak = 0
    times, cpu_times = [], []
    for step in range(args.warmup + args.steps):
        start, cpu = time.perf_counter(), time.process_time()
        loss = (model(x, t) - target).square().mean()
        loss.backward()
        optimizer.step()
        held = state_bytes(model, optimizer)  # gradients still allocated: the step's model state
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu)
        peak = max(peak, process.memory_info().rss)
    return {"step_ms": 1e3 * statistics.median(times), "cpu_ms": 1e3 * statistics.median(cpu_times),
            "state_mib": held / 2**20, "peak_rss_mib": peak / 2**20}  # fmt: skip


def _rank(rank: int, kind: str, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    world = 1 if kind == "single" else 2
    if world > 1:
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        dist.init_process_group("gloo", rank=rank, world_size=world)
    base = psutil.Process().memory_info().rss
    model = build(args)
    if kind == "single":
        pass
    elif kind == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh

        from vdiff.lit.scaling import shard_module

        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",))
        holder = torch.nn.Module()
        holder.net = model
        shard_module(holder, model, mesh)
    result = train(model, args, rank, world)
    result["peak_rss_mib"] -= base / 2**20
    Path(out, f"{kind}{rank}.json").write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.hidden, args.depth, args.heads = (64, 2, 2) if args.quick else (192, 6, 3)
    args.batch, args.frames, args.size = (2, 4, 8) if args.quick else (4, 8, 16)
    torch.set_num_threads(1)
    # Warm up in the parent (kernels, allocator, lazily loaded libraries) so that every forked run starts alike.
    warm = argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 0})
    train(build(warm), warm, 0, 1)
    rows = {}
    out = tempfile.mkdtemp(prefix="vdiff-strategies-")
    names = {
        "single": "1 process, whole batch",
        "ddp": "2 processes, DDP",
        "fsdp2": "2 processes, FSDP2 fully_shard per block",
    }
    for kind in ("single", "ddp", "fsdp2"):
        nprocs = 1 if kind == "single" else 2
        mp.start_processes(_rank, args=(kind, free_port(), args, out), nprocs=nprocs, start_method="fork")
        ranks = [json.loads(Path(out, f"{kind}{r}.json").read_text()) for r in range(nprocs)]
        rows[names[kind]] = {k: max(r[k] for r in ranks) for k in ranks[0]}
    print(f"VDT D={args.hidden}, {args.depth} blocks; global batch ({args.batch}, {args.frames}, 4, {args.size}, {args.size}); "
          f"AdamW fp32; 1 torch thread per process; {os.cpu_count()} cores; max over ranks")  # fmt: skip
    print(f"{'run':<40} {'step ms':>8} {'CPU ms':>8} {'model state MiB':>16} {'peak RSS MiB':>13}")
    for name, r in rows.items():
        print(f"{name:<40} {r['step_ms']:>8.1f} {r['cpu_ms']:>8.1f} {r['state_mib']:>16.1f} {r['peak_rss_mib']:>13.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
