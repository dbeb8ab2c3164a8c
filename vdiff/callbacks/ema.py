"""Exponential moving average of a module's trained weights, swapped in for validation and sampling.

Lightning 2.6's ``EMAWeightAveraging`` deep-copies the whole LightningModule (autoencoder and all)
onto the training device and does not support sharded models. :class:`EMA` keeps float32 shadows
of only the parameters ``pl_module.ema_named_parameters()`` names (the trainable network, so a
frozen VAE or CLIP encoder is never copied; with LoRA, only the adapters), keyed by parameter name:

* **Placement.** ``placement="device"`` keeps the shadows beside the weights (one fp32 copy of the
  trained parameters on the accelerator). ``placement="cpu"`` keeps them in host memory (pinned when
  the weights are on CUDA) and takes the update off the training step's critical path: the weights
  are copied to a host staging buffer (on CUDA with ``non_blocking`` copies on a side stream, the
  next optimizer step waiting on that stream only), and a background thread averages them into the
  shadows while the next forward/backward runs. The accelerator then holds no EMA tensor at all. On
  CPU-only runs the same code path runs with a thread doing the copy and the average.
* **Sharding.** Under FSDP2 / ``ModelParallelStrategy`` parameters are DTensors and every rank
  averages its own local shard. Full tensors are gathered (one parameter at a time) only to save a
  checkpoint; on resume every rank cuts its shard from the saved full tensors. Under DDP every rank
  averages its (identical) replica.
* **Swapping.** For validation, test, predict (and so for :class:`~vdiff.callbacks.SampleVideos`,
  which samples inside validation) the averaged weights are put in place without a third copy of
  the network: when a plain parameter has the shadow's dtype and device the two tensors are simply
  exchanged (``param.data`` <-> shadow: no copy, no memory); DTensor shards are swapped value by
  value through one parameter-sized scratch tensor at a time; when dtype or device differ (bf16
  weights, CPU placement) the trained weights wait in a host buffer. ``validate_raw=True`` also
  scores the trained weights on every validation batch and logs them under ``raw_prefix``.

The update rule, counted in optimizer steps (training batches that ended with an optimizer step:
``trainer.global_step`` under automatic optimization with one optimizer; under gradient accumulation
exactly one per optimizer step; with several optimizers stepped per batch, one per batch)::

    shadow <- d * shadow + (1 - d) * weights,     d = prod_{j < k} decay_j,

where ``k`` is the number of optimizer steps since the last update (``update_every``) and ``decay_j``
the per-step decay (``decay``, or with ``warmup`` ``min(decay, (1 + n) / (10 + n))`` at the ``n``-th
averaged step). With ``k = 1`` this is the usual per-step EMA. With ``k > 1``, ``d = decay**k``
gives the last weights the weight that ``k`` per-step updates give the window's weights together:
exact when the weights do not move within the window, and otherwise the same average in expectation
(the window's weights are replaced by its last one, a lag of at most ``k`` steps against the EMA's
horizon of ``1 / (1 - decay)`` steps). Updates happen at steps ``start_step + j * update_every``;
at ``start_step > 0`` the shadows are first set to the weights (with ``start_step=1`` and no
warm-up this is exactly Lightning's ``EMAWeightAveraging``).

Checkpoints hold the shadows once, by name, as full fp32 tensors under ``checkpoint["ema_state_dict"]``
(so a checkpoint can be sampled with EMA weights: :func:`vdiff.lit.module_loading.load_ema_weights`); the
callback's own state holds only its counters. Resuming restores both exactly. The sharded-tensor helpers
(``local_tensor``, ``full_tensor``, ``shard_like``, ``reshard_fsdp``) are :mod:`vdiff.lit.scaling`'s.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from vdiff.lit.checkpointing import EMA_KEY, load_ema_weights  # noqa: F401 - load_ema_weights: older code's name
from vdiff.lit.scaling import full_tensor, is_dtensor, local_tensor, reshard_fsdp, shard_like

Placement = Literal["device", "cpu"]
CHUNK_NUMEL = 1 << 24  # elements converted to fp32 at once when the weights are not fp32 (64 MiB)


# ---------------------------------------------------------------------------- parameters


def tracked_parameters(pl_module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` pairs an EMA tracks: the module's ``ema_named_parameters()`` when it has
    one (vdiff diffusion modules: the trainable network), else those of its ``ema_parameters()``
    (by their names in the module), else every trainable parameter."""
    if hasattr(pl_module, "ema_named_parameters"):
        return list(pl_module.ema_named_parameters())
    if hasattr(pl_module, "ema_parameters"):
        wanted = {id(p) for p in pl_module.ema_parameters()}
        return [(n, p) for n, p in pl_module.named_parameters() if id(p) in wanted]
    return [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]


def _chunks(pairs: list[tuple[Tensor, Tensor]], numel: int) -> Iterator[list[tuple[Tensor, Tensor]]]:
    chunk, size = [], 0
    for pair in pairs:
        chunk.append(pair)
        size += pair[1].numel()
        if size >= numel:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


@torch.no_grad()
def lerp_into(shadows: list[Tensor], weights: list[Tensor], weight: float) -> None:
    """``shadow += weight * (w - shadow)`` for every pair; fp32 shadows, weights of any float dtype
    (converted in chunks of :data:`CHUNK_NUMEL` elements, so no full fp32 copy is ever made)."""
    same = [(s, w) for s, w in zip(shadows, weights) if w.dtype == s.dtype]
    other = [(s, w) for s, w in zip(shadows, weights) if w.dtype != s.dtype]
    if same:
        torch._foreach_lerp_([s for s, _ in same], [w for _, w in same], weight)
    for chunk in _chunks(other, CHUNK_NUMEL):
        torch._foreach_lerp_([s for s, _ in chunk], [w.to(s.dtype) for s, w in chunk], weight)


# ---------------------------------------------------------------------------- the callback


class EMA(L.Callback):
    """Keep ``shadow = d * shadow + (1 - d) * weights`` of the trained parameters (module docstring).

    Args:
        decay: the EMA decay per optimizer step (Vista: 0.9999).
        warmup: per-step decay ``min(decay, (1 + n) / (10 + n))`` at the ``n``-th averaged step, so
            that short runs are not dominated by the random initialisation.
        start_step: the optimizer step from which the average runs. 0: from the weights at the start
            of training. ``> 0``: the shadows are set to the weights at that step.
        update_every: update every this many optimizer steps with ``d = prod of the k per-step decays``
            (``decay**k`` without warm-up); see the module docstring.
        placement: ``"device"`` (shadows beside the weights) or ``"cpu"`` (host memory, pinned on CUDA;
            the update runs in a background thread off the critical path).
        use_for_validation: evaluate (validation, test, predict, sampled videos) with the EMA weights.
        validate_raw: with ``use_for_validation``, also run every validation batch with the trained
            weights and log what the module logs under ``raw_prefix`` (``val/psnr`` -> ``val_raw/psnr``).
        raw_prefix: replaces a leading ``val/`` of the raw metrics' names (or is prepended).
    """

    def __init__(
        self,
        decay: float = 0.9999,
        warmup: bool = True,
        start_step: int = 0,
        update_every: int = 1,
        placement: Placement = "device",
        use_for_validation: bool = True,
        validate_raw: bool = False,
        raw_prefix: str = "val_raw/",
    ) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        if placement not in ("device", "cpu"):
            raise ValueError(f"EMA placement must be 'device' or 'cpu', got {placement!r}")
        if start_step < 0 or update_every < 1:
            raise ValueError(f"EMA needs start_step >= 0 and update_every >= 1, got {start_step} and {update_every}")
        self.decay = decay
        self.warmup = warmup
        self.start_step = int(start_step)
        self.update_every = int(update_every)
        self.placement = placement
        self.use_for_validation = use_for_validation
        self.validate_raw = validate_raw
        self.raw_prefix = raw_prefix
        # Averaged weights: fp32 local tensors (this rank's shard of a DTensor) by parameter name.
        self.shadow: dict[str, Tensor] | None = None
        # Counters (the callback state; the shadows go to checkpoint["ema_state_dict"]).
        self.steps = 0  # optimizer steps seen
        self.num_updates = 0  # times the shadows were written (the first copy included)
        self.steps_averaged = 0  # optimizer steps the average covers since it started (warm-up)
        self.last_update = 0  # `steps` at the last update
        self._state_loaded = False
        self._pending_shadow: dict[str, Tensor] | None = None
        self._step_at_batch_start: int | None = None
        self._swap: dict[str, str] | None = None  # name -> how it was swapped in ("exchange"/"values"/"staged")
        self._runtime_init()

    def _runtime_init(self) -> None:
        self._staging: dict[str, Tensor] = {}  # host buffers in the weights' dtype (CPU placement, staged swaps)
        self._pool: ThreadPoolExecutor | None = None
        self._future: Future | None = None
        self._copied: threading.Event | None = None  # CPU-only: set when the job has read the weights
        self._copy_event: Any = None  # CUDA: recorded after the side-stream copy of the weights
        self._stream: Any = None
        self._raw_sums: dict[str, float] = defaultdict(float)
        self._raw_counts: dict[str, float] = defaultdict(float)

    def __getstate__(self) -> dict[str, Any]:  # threads, streams and events do not pickle
        state = dict(self.__dict__)
        for key in ("_staging", "_pool", "_future", "_copied", "_copy_event", "_stream", "_raw_sums", "_raw_counts"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._runtime_init()

    # ------------------------------------------------------------------ decay

    def current_decay(self, steps_averaged: int | None = None) -> float:
        """The per-step decay at the ``steps_averaged``-th averaged step (default: the next one)."""
        if not self.warmup:
            return self.decay
        n = self.steps_averaged if steps_averaged is None else steps_averaged
        return min(self.decay, (1 + n) / (10 + n))

    def update_decay(self, steps: int) -> float:
        """``d`` of an update covering the next ``steps`` optimizer steps: the product of their decays."""
        if not self.warmup:
            return self.decay**steps
        return math.prod(self.current_decay(self.steps_averaged + j) for j in range(steps))

    def is_update_step(self, step: int) -> bool:
        return step >= self.start_step and (step - self.start_step) % self.update_every == 0

    # ------------------------------------------------------------------ shadows

    def _shadow_device(self, param: Tensor) -> torch.device:
        return torch.device("cpu") if self.placement == "cpu" else local_tensor(param).device

    def _new_buffer(self, like: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
        pin = device.type == "cpu" and like.device.type == "cuda"
        return torch.empty(like.shape, dtype=dtype, device=device, pin_memory=pin)

    @torch.no_grad()
    def _materialize(self, trainer: L.Trainer | None, pl_module: nn.Module) -> None:
        """Build the shadows (from the checkpoint's, or from the weights) once the weights are final:
        at the first training batch, i.e. after any checkpoint restore and strategy setup."""
        if self.shadow is not None and self._pending_shadow is None:
            return
        reshard_fsdp(pl_module)
        params = dict(tracked_parameters(pl_module))
        if self._pending_shadow is not None:
            stored = self._pending_shadow
            missing, unexpected = sorted(set(params) - set(stored)), sorted(set(stored) - set(params))
            if missing or unexpected:
                raise RuntimeError(
                    "EMA: the checkpoint's shadows do not match the model's tracked parameters "
                    f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})"
                )
            sources = {}
            for n, p in params.items():
                if tuple(stored[n].shape) != tuple(p.shape):
                    raise RuntimeError(
                        f"EMA: checkpoint shadow {n} has shape {tuple(stored[n].shape)}, the parameter {tuple(p.shape)}"
                    )
                sources[n] = shard_like(p, stored[n].to(torch.float32))
            self._pending_shadow = None
        else:
            if not self._state_loaded and trainer is not None:  # EMA added to a run: count from its step
                self.steps = self.last_update = int(trainer.global_step)
            sources = {n: local_tensor(p) for n, p in params.items()}
        self.shadow = {}
        for n, p in params.items():
            buffer = self._new_buffer(local_tensor(p), torch.float32, self._shadow_device(p))
            buffer.copy_(sources[n])
            self.shadow[n] = buffer

    # ------------------------------------------------------------------ updates

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Shadows are built at the first training batch: under ModelParallelStrategy the checkpoint is
        # restored after on_fit_start. Without a checkpoint the weights are the same then.
        self._step_at_batch_start = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._materialize(trainer, pl_module)
        self._step_at_batch_start = int(trainer.global_step)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self._wait_for_copy()  # the optimizer writes the weights a background update may still be reading

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        start, self._step_at_batch_start = self._step_at_batch_start, None
        if self.shadow is None or start is None or trainer.global_step <= start:
            return  # no optimizer step in this batch (gradient accumulation)
        self.steps += 1
        if not self.is_update_step(self.steps):
            return
        params = tracked_parameters(pl_module)
        names = list(self.shadow)
        if len(params) != len(names):
            raise RuntimeError(f"EMA: the module now tracks {len(params)} parameters, the shadows {len(names)}")
        weights = dict(params)
        locals_ = [local_tensor(weights[n]) for n in names]
        shadows = [self.shadow[n] for n in names]
        if self.num_updates == 0 and self.start_step > 0:  # the average starts here: copy the weights
            self._flush()
            for s, w in zip(shadows, locals_):
                s.copy_(w)
            weight = None
        else:
            gap = self.steps - self.last_update
            weight = 1.0 - self.update_decay(gap)
            self.steps_averaged += gap
        self.last_update = self.steps
        self.num_updates += 1
        if weight is None:
            return
        if self.placement == "cpu":
            self._update_in_background(names, shadows, locals_, weight)
        else:
            lerp_into(shadows, locals_, weight)

    def _update_in_background(
        self, names: list[str], shadows: list[Tensor], locals_: list[Tensor], weight: float
    ) -> None:
        """Copy the weights to the host staging buffers and average them into the shadows in a thread."""
        self._flush()  # the previous job is done with the staging buffers
        staging = [self._staging_buffer(n, w) for n, w in zip(names, locals_)]
        on_cuda = any(w.device.type == "cuda" for w in locals_)
        event, copied = None, None
        if on_cuda:
            device = next(w.device for w in locals_ if w.device.type == "cuda")
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=device)
            self._stream.wait_stream(torch.cuda.current_stream(device))  # the optimizer step has written them
            with torch.cuda.stream(self._stream):
                for buf, w in zip(staging, locals_):
                    buf.copy_(w, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
            self._copy_event = event
        else:
            copied = threading.Event()
            self._copied = copied

        def job() -> None:
            try:
                if event is not None:
                    event.synchronize()
                else:
                    torch._foreach_copy_(staging, locals_)
            finally:
                if copied is not None:
                    copied.set()
            lerp_into(shadows, staging, weight)

        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vdiff-ema")
        self._future = self._pool.submit(job)

    def _staging_buffer(self, name: str, like: Tensor) -> Tensor:
        buf = self._staging.get(name)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            buf = self._staging[name] = self._new_buffer(like, like.dtype, torch.device("cpu"))
        return buf

    def _wait_for_copy(self) -> None:
        """Block the weights' next writer until a background update has read them (CUDA: the current
        stream waits for the copy stream, the host does not wait)."""
        if self._copy_event is not None:
            torch.cuda.current_stream(self._copy_event_device()).wait_event(self._copy_event)
            self._copy_event = None
        if self._copied is not None:
            self._copied.wait()
            self._copied = None
        if self._future is not None and self._future.done():
            self._future.result()  # raise what the thread raised

    def _copy_event_device(self) -> torch.device | None:
        return self._stream.device if self._stream is not None else None

    def _flush(self) -> None:
        """Finish the background update (if any): the shadows and staging buffers are then final."""
        self._wait_for_copy()
        if self._future is not None:
            future, self._future = self._future, None
            future.result()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._flush()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # ------------------------------------------------------------------ swapping

    @torch.no_grad()
    def swap_in(self, pl_module: nn.Module) -> None:
        """Put the averaged weights into the module; :meth:`swap_out` puts the trained ones back.

        No third copy of the network: a plain parameter with the shadow's dtype and device exchanges
        its tensor with the shadow; a DTensor shard swaps values through one scratch tensor of its
        size; otherwise (bf16 weights, CPU placement) the trained values wait in a host buffer."""
        if self._swap is not None:
            return
        if self._pending_shadow is not None:  # restored from a checkpoint, no training batch since
            self._materialize(None, pl_module)
        if self.shadow is None:
            return
        self._flush()
        reshard_fsdp(pl_module)  # before the parameters are looked up
        params = dict(tracked_parameters(pl_module))
        modes = {}
        for n, s in self.shadow.items():
            p = params[n]
            if not is_dtensor(p) and p.dtype == s.dtype and p.device == s.device:
                p.data, self.shadow[n] = s, p.data
                modes[n] = "exchange"
                continue
            local = local_tensor(p)
            if local.dtype == s.dtype and local.device == s.device:
                scratch = local.clone()
                local.copy_(s)
                s.copy_(scratch)
                del scratch
                modes[n] = "values"
            else:
                self._staging_buffer(n, local).copy_(local)
                local.copy_(s)
                modes[n] = "staged"
        self._swap = modes

    @torch.no_grad()
    def swap_out(self, pl_module: nn.Module) -> None:
        """Restore the trained weights after :meth:`swap_in` (exactly)."""
        if self._swap is None:
            return
        modes, self._swap = self._swap, None
        reshard_fsdp(pl_module)  # before the parameters are looked up
        params = dict(tracked_parameters(pl_module))
        for n, mode in modes.items():
            p = params[n]
            if mode == "exchange":
                p.data, self.shadow[n] = self.shadow[n], p.data
            elif mode == "values":
                local, s = local_tensor(p), self.shadow[n]
                scratch = local.clone()
                local.copy_(s)
                s.copy_(scratch)
                del scratch
            else:
                local_tensor(p).copy_(self._staging[n])

    @contextmanager
    def averaged(self, pl_module: nn.Module) -> Iterator[None]:
        """``with ema.averaged(module):`` runs the block with the averaged weights swapped in."""
        self.swap_in(pl_module)
        try:
            yield
        finally:
            self.swap_out(pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.use_for_validation and not trainer.sanity_checking:
            self.swap_in(pl_module)
        self._raw_sums.clear()
        self._raw_counts.clear()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not (self.validate_raw and self._swap is not None and not trainer.sanity_checking):
            return
        # The same batch with the trained weights; what the module logs is collected, not logged.
        self.swap_out(pl_module)
        try:
            with torch.no_grad(), _collect_logs(pl_module, self._add_raw):
                if len(trainer.num_val_batches) > 1:
                    pl_module.validation_step(batch, batch_idx, dataloader_idx)
                else:
                    pl_module.validation_step(batch, batch_idx)
        finally:
            self.swap_in(pl_module)

    def _add_raw(self, name: str, value: Any, batch_size: int | None) -> None:
        weight = float(batch_size) if batch_size else 1.0
        value = value.detach().float().mean().item() if isinstance(value, Tensor) else float(value)
        self._raw_sums[name] += value * weight
        self._raw_counts[name] += weight

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not (self.validate_raw and self.use_for_validation) or trainer.sanity_checking:
            return
        names = sorted(self._raw_sums)
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[list[str]] = [[] for _ in range(trainer.world_size)]
            torch.distributed.all_gather_object(gathered, names)
            names = sorted({n for rank in gathered for n in rank})
        if not names:
            return
        totals = torch.tensor(
            [[self._raw_sums.get(n, 0.0), self._raw_counts.get(n, 0.0)] for n in names],
            dtype=torch.float64,
            device=pl_module.device,
        )
        if trainer.world_size > 1:  # exact over ranks: sums of value x batch size and of batch sizes
            totals = trainer.strategy.reduce(totals, reduce_op="sum")
        for name, (total, count) in zip(names, totals.tolist()):
            if count > 0:
                pl_module.log(self.raw_name(name), total / count, sync_dist=False)

    def raw_name(self, name: str) -> str:
        """The name a metric of the trained weights is logged under (``val/psnr`` -> ``val_raw/psnr``)."""
        return self.raw_prefix + (name[len("val/") :] if name.startswith("val/") else name)

    def on_validation_end(self, trainer, pl_module) -> None:
        self.swap_out(pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Stopped inside validation/test/predict (SIGTERM, Ctrl-C, an error): put the trained weights back
        # before a checkpoint is written on the way out (callbacks' on_exception run before ModelCheckpoint's).
        self.swap_out(pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        if self.use_for_validation:
            self.swap_in(pl_module)

    def on_test_end(self, trainer, pl_module) -> None:
        self.swap_out(pl_module)

    def on_predict_start(self, trainer, pl_module) -> None:
        if self.use_for_validation:
            self.swap_in(pl_module)

    def on_predict_end(self, trainer, pl_module) -> None:
        self.swap_out(pl_module)

    # ------------------------------------------------------------------ checkpointing

    @torch.no_grad()
    def ema_state_dict(self, pl_module: nn.Module, gather: bool = True) -> dict[str, Tensor]:
        """The averaged weights as full fp32 CPU tensors by parameter name. With sharded parameters this
        gathers them, one at a time (a collective: call it on every rank; ``gather=False`` returns
        this rank's shards)."""
        if self.shadow is None:
            return dict(self._pending_shadow or {})
        self._flush()
        swapped = self._swap is not None
        if swapped:
            self.swap_out(pl_module)
        try:
            reshard_fsdp(pl_module)
            params = dict(tracked_parameters(pl_module))
            return {n: full_tensor(params[n], s) if gather else s.detach().cpu() for n, s in self.shadow.items()}
        finally:
            if swapped:
                self.swap_in(pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # The model weights in a checkpoint are the trained ones; the averaged weights are stored once,
        # as full tensors under the module's own parameter names (gathered from the shards on every rank,
        # kept by rank 0, which writes the file).
        if self.shadow is None and self._pending_shadow is None:
            return
        reshard_fsdp(pl_module)
        sharded = any(is_dtensor(p) for _, p in tracked_parameters(pl_module))
        if not (sharded or trainer.is_global_zero):
            return  # replicas: rank 0 has the same values
        state = self.ema_state_dict(pl_module)
        if trainer.is_global_zero:
            checkpoint[EMA_KEY] = state

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        stored = checkpoint.get(EMA_KEY)
        if stored:
            self._pending_shadow = dict(stored)  # applied at the next batch, once the strategy has set up

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps, "num_updates": self.num_updates, "steps_averaged": self.steps_averaged,
            "last_update": self.last_update, "decay": self.decay, "update_every": self.update_every,
            "start_step": self.start_step, "warmup": self.warmup,
        }  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = int(state_dict.get("num_updates", 0))
        # Checkpoints of the earlier callback counted `last_step` (= global_step) and one update per step.
        self.steps = int(state_dict.get("steps", state_dict.get("last_step", self.num_updates)))
        self.steps_averaged = int(state_dict.get("steps_averaged", self.num_updates))
        self.last_update = int(state_dict.get("last_update", self.steps))
        self._state_loaded = True


@contextmanager
def _collect_logs(module: nn.Module, sink) -> Iterator[None]:
    """Within the block, ``module.log(name, value, ..., batch_size=)`` (and ``log_dict``) call
    ``sink(name, value, batch_size)`` instead of logging."""

    def log(name: str, value: Any, *args: Any, batch_size: int | None = None, **kwargs: Any) -> None:
        sink(name, value, batch_size)

    module.log = log  # an instance attribute shadows LightningModule.log
    try:
        yield
    finally:
        del module.log

