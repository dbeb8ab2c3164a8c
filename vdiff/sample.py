"""``vdiff sample``: sample videos from a checkpoint and write mp4s plus a PNG grid.

Input is a video file (any container PyAV reads) or shards (any spec ``expand_shard_spec``
accepts). Each input clip is cut from its first frame, resized to the model's frame size, and
completed with the chosen task; with ``--total-frames`` larger than the clip length the model
rolls out autoregressively (the last ``--given-frames`` frames condition the next window).

Outputs in ``--out``: ``<key>.mp4`` per clip (ground truth above sample for tasks with a target),
``<key>-sample.mp4`` (the sample alone) and ``grid.png`` (rows: clips; columns: frames; given
frames framed green, generated red).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vdiff.data.schema import META_EXT, VIDEO_EXT, VideoMeta
from vdiff.data.transforms import normalize_video


def _read_inputs(
    spec: str, num_frames: int, size: tuple[int, int], limit: int
) -> tuple[list[str], list[np.ndarray], list[float]]:
    """Decode up to ``limit`` clips of ``num_frames`` frames at ``size`` from a video or shards."""
    from vdiff.data.shards import expand_shard_spec, iter_raw_samples
    from vdiff.data.video_io import decode_clip, probe

    path = Path(spec)
    if path.is_file() and path.suffix.lower() != ".tar":
        info = probe(path)
        return [path.stem], [decode_clip(path, num_frames, size=size)], [info.fps]
    keys, clips, rates = [], [], []
    for shard in expand_shard_spec(spec):
        for key, files in iter_raw_samples(shard):
            if VIDEO_EXT not in files:
                continue
            fps = VideoMeta.from_json(files[META_EXT]).fps if META_EXT in files else probe(files[VIDEO_EXT]).fps
            clips.append(decode_clip(files[VIDEO_EXT], num_frames, size=size))
            keys.append(key)
            rates.append(fps)
            if len(clips) >= limit:
                return keys, clips, rates
    if not clips:
        raise FileNotFoundError(f"vdiff sample: no video samples in {spec!r}")
    return keys, clips, rates


def _to_video(frames: np.ndarray) -> Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) float in [-1, 1]."""
    return normalize_video(torch.from_numpy(frames).permute(0, 3, 1, 2))


def _to_frames(video: Tensor) -> np.ndarray:
    """(T, 3, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def write_grid(path: Path, videos: Tensor, given_frames: Tensor) -> None:
    """PNG grid: one row per clip, one column per frame; given frames green-framed, generated red."""
    from PIL import Image

    from vdiff.callbacks.sample_videos import mark_frames

    marked = mark_frames((videos.float().clamp(-1, 1) + 1) / 2, given_frames, width=2)  # (B, T, 3, H, W)
    b, t, _, h, w = marked.shape
    grid = marked.permute(0, 3, 1, 4, 2).reshape(b * h, t * w, 3)  # (B*H, T*W, 3)
    Image.fromarray((grid * 255).round().to(torch.uint8).cpu().numpy()).save(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="checkpoint written by `vdiff fit` (e.g. runs/x/checkpoints/last.ckpt)")
    parser.add_argument("--input", required=True, help="a video file, or shards (folder, manifest, brace pattern, glob)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--task", default=None, help="mask mode: prediction, backward, interpolation, unconditional, single_frame, ... (default: the model's validation task)")
    parser.add_argument("--given-frames", type=int, default=None, help="given frames for prediction/backward and rollouts")
    parser.add_argument("--num-frames", type=int, default=None, help="clip length per sampling window (default: the training clip length)")
    parser.add_argument("--total-frames", type=int, default=None, help="roll out autoregressively to this many frames")
    parser.add_argument("--size", type=int, nargs="+", default=None, help="frame size H [W] (default: the training size)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's sampler steps)")
    parser.add_argument("--sampler", default=None, help="ddim or ancestral (default: the model's)")
    parser.add_argument("--num-videos", type=int, default=4, help="clips to sample from the input")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ema", action="store_true", help="use the trained weights, not the EMA ones")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def _training_setting(ckpt: dict, key: str):
    return ckpt.get("vdiff_clip", {}).get(key)


def run(args: argparse.Namespace) -> int:
    from vdiff.callbacks.checkpoint_eval import load_module
    from vdiff.data.video_io import encode_video

    ckpt_path = Path(args.ckpt)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"vdiff sample: no checkpoint at {ckpt_path}")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)  # metadata only
    num_frames = args.num_frames or _training_setting(checkpoint, "num_frames")
    size = args.size or _training_setting(checkpoint, "size")
    if num_frames is None or size is None:
        raise ValueError(f"vdiff sample: {ckpt_path} does not record the training clip length/size; pass --num-frames and --size")
    size = (size, size) if isinstance(size, int) else tuple(size) * (2 // len(size))
    del checkpoint

    module = load_module(str(ckpt_path), map_location=args.device, use_ema=not args.no_ema)
    total = args.total_frames or num_frames
    read_frames = num_frames if total <= num_frames else (args.given_frames or module.evaluation.given_frames)
    keys, clips, rates = _read_inputs(args.input, read_frames, size, args.num_videos)
    video = torch.stack([_to_video(c) for c in clips]).to(args.device)  # (B, T, 3, H, W)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)

    if total > num_frames:
        given = args.given_frames or module.evaluation.given_frames
        sample = module.rollout(video, total, window=num_frames, given_frames=given, sampler=args.sampler,
                                steps=args.steps, generator=generator, progress=True)
        given_frames = torch.zeros(sample.shape[:2], dtype=torch.bool, device=sample.device)
        given_frames[:, :given] = True
        target = None
    else:
        batch = {"video": video, "key": keys, "fps": torch.tensor(rates)}
        result = module.generate(batch, task=args.task, given_frames=args.given_frames, sampler=args.sampler,
                                 steps=args.steps, generator=generator, progress=True)
        sample, given_frames, target = result.video, result.given_frames, result.target

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, key in enumerate(keys):
        fps = rates[i]
        (out / f"{key}-sample.mp4").write_bytes(encode_video(_to_frames(sample[i]), fps=fps))
        if target is not None:
            both = torch.cat([target[i], sample[i]], dim=-2)  # ground truth above sample
            (out / f"{key}.mp4").write_bytes(encode_video(_to_frames(both), fps=fps))
    write_grid(out / "grid.png", sample, given_frames)
    (out / "samples.json").write_text(json.dumps({
        "checkpoint": str(ckpt_path), "keys": keys, "frames": int(sample.shape[1]),
        "task": args.task or module.evaluation.task, "sampler": module.sampler_with(args.sampler, args.steps).describe(),
        "rollout": total > num_frames,
    }, indent=1))
    print(f"wrote {len(keys)} samples of {sample.shape[1]} frames to {out}")
    return 0
