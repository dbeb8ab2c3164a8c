"""``vdiff sample``: sample videos from a checkpoint and write mp4s plus a PNG grid.

Two modes.

**A task on clips** (``--input VIDEO_OR_SHARDS``). Input is a video file (any container PyAV reads) or
shards (any spec ``expand_shard_spec`` accepts). Each input clip is cut from its first frame, resized
to the model's frame size, and completed with the chosen task; with ``--total-frames`` larger than the
clip length the model rolls out autoregressively (the last ``--given-frames`` frames condition the
next window). Outputs in ``--out``: ``<key>.mp4`` per clip (ground truth above sample for tasks with a
target), ``<key>-sample.mp4`` (the sample alone) and ``grid.png`` (rows: clips; columns: frames; given
frames framed green, generated red). A key names a file only as a plain, unique name
(:func:`vdiff.data.names.unique_names`: ``../../x`` or ``sub/dir/k`` get their unsafe characters replaced and a
hash appended); ``samples.json`` lists the keys and their ``names``.

**Image to video** (``--image FILE``, or one frame of a video: ``--input VIDEO --frame N``), for
checkpoints of a module with SVD's conditioning (:class:`~vdiff.lit.svd.SVDModule`). The image is
resized to ``--size`` (default: the training size recorded in the checkpoint, else the image's own
size; a plain resize, the aspect ratio is not kept, as SVD's sampling script does) and conditions a
clip of ``--num-frames`` frames (default: the training clip length) exactly as SVD samples
(:meth:`~vdiff.lit.svd.SVDModule.image_to_video`): the CLIP embedding of the clean image, the autoencoder's
posterior mode of the image plus ``cond_aug`` noise, the micro-conditioning ``(fps_id, motion_bucket_id, cond_aug)``,
Euler EDM with SVD's initial-noise scale and frame-wise linear CFG, then a decode in temporal chunks
of ``--decode-chunk`` frames. Random numbers are drawn as diffusers' ``StableVideoDiffusionPipeline``
draws them from its generator: first the conditioning-frame noise ``(B, 3, H, W)``, then the initial
latents ``(B, T, c, h, w)``; with the same weights, image, seed and settings both give the same video
(``tests/test_svd_pipeline_parity.py``). Outputs: ``<stem>-sample.mp4`` (written at ``fps_id + 1``
frames per second, as SVD's script), ``grid.png`` and ``samples.json`` (every setting used).

    vdiff sample --ckpt last.ckpt --image street.png --out out/ --size 1024x576 --num-frames 14 \\
        --fps 7 --motion-bucket-id 127 --cond-aug 0.02 --steps 25 --min-guidance 1 --max-guidance 2.5 \\
        --decode-chunk 7 --seed 0

Frame sides must be multiples of the autoencoder's spatial downsampling times the UNet's total
downsampling (SVD: 8 x 8 = 64); other sizes are refused with that rule.

**Vista long rollouts** (``--rounds N``, checkpoints of :class:`~vdiff.lit.vista.VistaModule`), through
:meth:`~vdiff.lit.vista.VistaModule.rollout_rounds`: the first window of ``T`` frames (the training clip length, or
``--num-frames``) is predicted from the input clip's first ``--given-frames`` frames (default: the module's
evaluation protocol); each later window starts from the last ``--overlap`` (3) latents of the previous one,
pasted at every step, with the image condition (CLIP embedding and concat latent) moved to the first of them (the
third frame from the end); ``T + (T - overlap) (N - 1)`` frames in all (25 + 22 (N - 1) for Vista).
``--triangle-guidance MIN MAX`` samples every window with Vista's triangle-wave CFG (Vista's rollouts: 1.0 2.5);
otherwise the module's guidance. Actions condition each round: ``--actions FILE`` (JSON: a list with one entry per
round, or one entry used for every round; an entry is a dict ``{action: value}`` in the shard json's layout, a
value being one entry per frame of the window (``null`` = invalid) or a single value for every frame, e.g.
``{"speed": 8.0, "steering": -90.0}``, or a list of per-frame dicts), else the actions recorded in the input shards
over the frames each round covers (invalid past the recording), else none (unconditional). A file of the wrong
length, an unknown action or a per-frame list of the wrong length is refused naming the file. All latents are
decoded at the end in overlapping temporal chunks (``--decode-chunk``, ``--decode-overlap``; Vista: 14 and 3).
``--uncertainty K`` prints Vista's uncertainty reward for the first window of every clip (the variance over an
ensemble of K samples, :meth:`~vdiff.lit.vista.VistaModule.uncertainty`, and Vista's reward ``exp(-mean
variance)`` over all frames as its ``reward.py`` computes it); without ``--rounds`` nothing else is sampled.

    vdiff sample --ckpt vista.ckpt --input data/nuscenes/val --num-videos 2 --out out/ --rounds 4 --overlap 3 \\
        --triangle-guidance 1 2.5 --actions turn_left.json --decode-chunk 14 --decode-overlap 3 --uncertainty 4

The tool only reads arguments and inputs, calls the module's methods (``generate``, ``rollout``,
``image_to_video``, ``rollout_rounds``, ``uncertainty``, ``reward``) with every setting as an argument, and
writes files; the module is never changed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vdiff.data.frame_size import add_size_argument
from vdiff.data.names import safe_name, unique_names
from vdiff.data.schema import META_EXT, VIDEO_EXT, VideoMeta
from vdiff.data.transforms import normalize_video


def _read_inputs(
    spec: str, num_frames: int, size: tuple[int, int], limit: int
) -> tuple[list[str], list[np.ndarray], list[float], list[dict[str, list] | None]]:
    """Up to ``limit`` clips of ``num_frames`` frames at ``size`` from a video or shards: keys, clips, frame rates and
    the shards' recorded actions (a json's per-frame lists; None for a video file or a sample without them)."""
    from vdiff.data.shards import expand_shard_spec, iter_raw_samples
    from vdiff.data.video_io import decode_clip, probe

    path = Path(spec)
    if path.is_file() and path.suffix.lower() != ".tar":
        fps = probe(path).fps
        return [path.stem], [decode_clip(path, num_frames, size=size)], [fps], [None]
    keys, clips, rates, recorded = [], [], [], []
    for shard in expand_shard_spec(spec):
        for key, files in iter_raw_samples(shard):
            if VIDEO_EXT not in files:
                continue
            meta = VideoMeta.from_json(files[META_EXT]) if META_EXT in files else None
            clips.append(decode_clip(files[VIDEO_EXT], num_frames, size=size))
            keys.append(key)
            rates.append(meta.fps if meta is not None else probe(files[VIDEO_EXT]).fps)
            recorded.append(dict(meta.actions) if meta is not None and meta.actions else None)
            if len(clips) >= limit:
                return keys, clips, rates, recorded
    if not clips:
        raise FileNotFoundError(f"vdiff sample: no video samples in {spec!r}")
    return keys, clips, rates, recorded


def _to_video(frames: np.ndarray) -> Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) float in [-1, 1]."""
    return normalize_video(torch.from_numpy(frames).permute(0, 3, 1, 2))


def _to_frames(video: Tensor) -> np.ndarray:
    """(T, 3, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def write_grid(path: Path, videos: Tensor, given_frames: Tensor) -> None:
    """PNG grid: one row per clip, one column per frame; given frames green-framed, generated red."""
    from PIL import Image

    from vdiff.lit.frame_marks import mark_frames

    marked = mark_frames((videos.float().clamp(-1, 1) + 1) / 2, given_frames, width=2)  # (B, T, 3, H, W)
    b, t, _, h, w = marked.shape
    grid = marked.permute(0, 3, 1, 4, 2).reshape(b * h, t * w, 3)  # (B*H, T*W, 3)
    Image.fromarray((grid * 255).round().to(torch.uint8).cpu().numpy()).save(path)


# ----------------------------------------------------------------------------------------------
# Image to video (SVD conditioning)
# ----------------------------------------------------------------------------------------------


def check_size(module: Any, size: tuple[int, int]) -> None:
    """Raise ValueError unless both sides of ``size`` (H, W) are multiples of the autoencoder's spatial downsampling
    times the UNet's total downsampling (:func:`vdiff.lit.svd.check_frame_size`)."""
    from vdiff.lit.svd import check_frame_size

    check_frame_size(module, size, "vdiff sample")


def _resize(frame: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """``(H, W, 3)`` uint8 resized to ``size`` (H, W) with PIL's Lanczos filter (diffusers' pipeline filter)."""
    if size is None or frame.shape[:2] == tuple(size):
        return frame
    from PIL import Image

    return np.array(Image.fromarray(frame).resize((size[1], size[0]), Image.Resampling.LANCZOS))


def read_image(path: str | Path, size: tuple[int, int] | None = None) -> Tensor:
    """An image file -> ``(3, H, W)`` float in [-1, 1], RGB, resized to ``size`` (H, W) when given."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as image:
            frame = np.array(image.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as error:
        reason = "no such file" if not path.exists() else f"not a readable image ({type(error).__name__}: {error})"
        raise ValueError(f"vdiff sample: cannot read image {path}: {reason}") from None
    return _to_video(_resize(frame, size)[None])[0]


def read_video_frame(path: str | Path, index: int, size: tuple[int, int] | None = None) -> tuple[Tensor, float]:
    """Frame ``index`` of a video file -> ``((3, H, W) float in [-1, 1], the video's fps)``."""
    from vdiff.data.video_io import VideoDecodeError, decode_frames, probe

    path = Path(path)
    if index < 0:
        raise ValueError(f"vdiff sample: --frame must be >= 0, got {index}")
    try:
        info = probe(path)
        frame = decode_frames(path, [index], allow_odd_size=True)[0]
    except VideoDecodeError as error:
        raise ValueError(f"vdiff sample: cannot read frame {index} of {path}: {error}") from None
    return _to_video(_resize(frame, size)[None])[0], float(info.fps)


def _svd_module_class() -> type:
    from vdiff.lit.svd import SVDModule

    return SVDModule


# ----------------------------------------------------------------------------------------------
# Vista long rollouts
# ----------------------------------------------------------------------------------------------

VISTA_OPTIONS = ("rounds", "triangle_guidance", "actions", "uncertainty")  # any of them selects a Vista run


def vista_requested(args: argparse.Namespace) -> bool:
    """Whether the command line asks for a Vista rollout or uncertainty (any of :data:`VISTA_OPTIONS`)."""
    return any(getattr(args, name, None) is not None for name in VISTA_OPTIONS)


def _per_frame(key: str, value: Any, shape: tuple[int, ...], window: int, where: str) -> list[Any]:
    """One action's value in an actions file: ``window`` per-frame entries (``null`` = invalid) or one value of the
    action's shape for every frame."""
    def has_shape(v: Any, ndim: int) -> bool:
        try:
            return np.ndim(v) == ndim
        except ValueError:  # ragged nested lists
            return False

    if isinstance(value, list) and len(value) == window and all(v is None or has_shape(v, len(shape)) for v in value):
        return value
    if value is not None and has_shape(value, len(shape)) and np.shape(value) == shape:
        return [value] * window
    raise ValueError(
        f"{where}: action {key!r} must be one value of shape {shape} for every frame, or a list of {window} per-frame "
        f"values (null = invalid) for a window of {window} frames; got {json.dumps(value)[:80]}"
    )


def round_actions(entry: Any, window: int, where: str) -> dict[str, np.ndarray]:
    """One round's actions from an actions file: a dict ``{action: per-frame list | one value}`` or a list of
    ``window`` per-frame dicts -> per-frame arrays ``(T, *shape)`` and ``<action>_valid`` (the shard schema's)."""
    from vdiff.data.schema import ACTION_SHAPES, SchemaError
    from vdiff.data.transforms import clip_actions

    if isinstance(entry, list):  # per-frame dicts
        if len(entry) != window or not all(frame is None or isinstance(frame, dict) for frame in entry):
            raise ValueError(
                f"{where}: a list entry must hold {window} per-frame action dicts (one per frame of the window), "
                f"got {len(entry)} items"
            )
        keys = sorted({key for frame in entry if frame for key in frame})
        entry = {key: [(frame or {}).get(key) for frame in entry] for key in keys}
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: an entry must be a dict of actions or a list of per-frame dicts, got {entry!r}")
    unknown = sorted(set(entry) - set(ACTION_SHAPES))
    if unknown:
        raise ValueError(f"{where}: unknown action(s) {unknown}; actions are {sorted(ACTION_SHAPES)}")
    per_frame = {key: _per_frame(key, value, ACTION_SHAPES[key], window, where) for key, value in entry.items()}
    try:
        return clip_actions(per_frame, range(window))
    except SchemaError as error:
        raise ValueError(f"{where}: {error}") from None


def load_actions_file(path: str | Path, rounds: int, window: int) -> list[dict[str, np.ndarray]]:
    """``--actions FILE``: a JSON list with one entry per round, or a single entry (not in a list) for every round;
    returns the per-round arrays (:func:`round_actions`). Refused with one ValueError naming the file: a list of
    another length than ``rounds``, a file that cannot be read or is not JSON (a folder, not UTF-8, nested too
    deeply), and ``NaN``, ``Infinity`` or a number beyond float32's range (write ``null`` for an unknown value)."""
    from vdiff.data.schema import SchemaError, parse_json

    path = Path(path)
    try:
        data = parse_json(path.read_bytes(), f"actions file {path}", strict_numbers=True)
    except FileNotFoundError:
        raise ValueError(f"vdiff sample: no actions file {path}") from None
    except OSError as error:  # a directory, no permission, ...
        raise ValueError(f"vdiff sample: cannot read actions file {path}: {error.strerror or error}") from None
    except SchemaError as error:  # not JSON or UTF-8, nested too deeply, NaN/Infinity, beyond float32
        raise ValueError(f"vdiff sample: {error}") from None
    if isinstance(data, list):
        if len(data) != rounds:
            raise ValueError(
                f"vdiff sample: actions file {path} holds {len(data)} round(s) of actions but --rounds is {rounds}: "
                "give one entry per round, or a single dict (not in a list) used for every round"
            )
        entries = data
    else:
        entries = [data] * rounds
    return [
        round_actions(entry, window, f"vdiff sample: actions file {path}, round {r}") for r, entry in enumerate(entries)
    ]


def _run_vista(
    args: argparse.Namespace, module: Any, ckpt_path: Path, num_frames: int | None, size: tuple[int, int] | None
) -> int:
    from vdiff.data.video_io import encode_video
    from vdiff.diffusion.guidance import TriangleCFG

    if not (hasattr(module, "rollout_rounds") and hasattr(module, "uncertainty")):
        raise ValueError(
            "vdiff sample: --rounds, --triangle-guidance, --actions and --uncertainty need a Vista checkpoint "
            f"(VistaModule); {ckpt_path} holds a {type(module).__name__}"
        )
    if args.image is None and args.input is None:
        raise ValueError("vdiff sample: a rollout starts from --input (a video or shards) or --image FILE")
    if num_frames is None or size is None:
        raise ValueError(
            f"vdiff sample: {ckpt_path} does not record the training clip length/size; pass --num-frames and --size"
        )
    window, overlap = int(num_frames), int(args.overlap)
    rounds = 1 if args.rounds is None else int(args.rounds)
    given = int(args.given_frames or module.evaluation.given_frames)
    if rounds < 1:
        raise ValueError(f"vdiff sample: --rounds must be >= 1, got {rounds}")
    if not 0 <= overlap < window:
        raise ValueError(
            f"vdiff sample: --overlap must be in [0, {window}) for windows of {window} frames, got {overlap}"
        )
    if not 1 <= given < window:
        raise ValueError(f"vdiff sample: --given-frames must be in [1, {window}), got {given}")
    if args.uncertainty is not None and args.uncertainty < 2:
        raise ValueError(f"vdiff sample: --uncertainty needs an ensemble of at least 2 samples, got {args.uncertainty}")
    if args.decode_chunk is not None and args.decode_chunk < 1:
        raise ValueError(f"vdiff sample: --decode-chunk must be >= 1, got {args.decode_chunk}")
    check_size(module, size)

    if args.image is not None:
        image = read_image(args.image, size)  # (3, H, W)
        batch = module.image_batch(image[None].to(args.device), window)  # the image at every frame (Vista's IMG)
        keys, rates, recorded = [Path(args.image).stem], batch["fps"].tolist(), [None]
    else:
        keys, clips, rates, recorded = _read_inputs(args.input, window, size, args.num_videos)
        video = torch.stack([_to_video(c) for c in clips]).to(args.device)  # (B, T, 3, H, W)
        batch = {"video": video, "fps": torch.tensor(rates, dtype=torch.float32)}
    batch["key"] = keys
    if args.actions is not None:
        actions = module.rollout_actions(load_actions_file(args.actions, rounds, window), len(keys))
        actions_source = f"file {args.actions}"
    elif any(r is not None for r in recorded):
        actions = module.recorded_rollout_actions(recorded, rounds, window, overlap)
        actions_source = "recorded in the input shards"
    else:
        actions, actions_source = None, "none (unconditional)"
    if actions is not None:
        batch["actions"] = actions[0]

    guidance = TriangleCFG(*args.triangle_guidance) if args.triangle_guidance is not None else None
    sampler = module.sampler_with(args.sampler, args.steps)
    names = unique_names(keys)  # output files are named after the keys, made safe (vdiff.data.names)
    summary: dict[str, Any] = {"checkpoint": str(ckpt_path), "keys": keys, "names": names, "window": window,
                               "given_frames": given, "actions": actions_source, "sampler": sampler.describe(),
                               "seed": args.seed,
                               "guidance": repr(guidance if guidance is not None else module.guidance)}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.rounds is not None:
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
        _, latents = module.rollout_rounds(
            batch, rounds, overlap, actions=actions, guidance=guidance, sampler=sampler, generator=generator,
            progress=True, return_latents=True, given_frames=given, decode_chunk=args.decode_chunk,
            decode_overlap=args.decode_overlap,
        )  # fmt: skip
        # the whole rollout decoded at once, in overlapping chunks across the windows' seams (as Vista does)
        sample = module.decode_latents(latents, args.decode_chunk, args.decode_overlap)  # (B, N', 3, H, W)
        for i, name in enumerate(names):
            (out / f"{name}-sample.mp4").write_bytes(encode_video(_to_frames(sample[i]), fps=rates[i]))
        marks = torch.zeros(sample.shape[:2], dtype=torch.bool)
        marks[:, :given] = True
        write_grid(out / "grid.png", sample, marks)
        summary.update(frames=int(sample.shape[1]), rounds=rounds, overlap=overlap,
                       decode_chunk=args.decode_chunk, decode_overlap=args.decode_overlap)  # fmt: skip
        print(f"wrote {len(keys)} rollouts of {sample.shape[1]} frames ({rounds} rounds of {window}, overlap "
              f"{overlap}) to {out}")  # fmt: skip
    if args.uncertainty is not None:
        values = module.uncertainty(batch, num_samples=args.uncertainty, seed=args.seed, given_frames=given,
                                    sampler=sampler, guidance=guidance).cpu()  # (B,)  # fmt: skip
        rewards = module.reward(values, window, given)
        print(f"Vista uncertainty: variance over an ensemble of {args.uncertainty} samples of the first window "
              f"({given} given, {window - given} generated frames; latent space, mean over generated elements); "
              "reward = exp(-variance averaged over all frames), as Vista's reward.py")  # fmt: skip
        for key, value, reward in zip(keys, values.tolist(), rewards.tolist()):
            print(f"  {key}: uncertainty {value:.6g}  reward {reward:.6g}")
        summary["uncertainty"] = {"ensemble": args.uncertainty, "values": dict(zip(keys, values.tolist())),
                                  "reward": dict(zip(keys, rewards.tolist()))}  # fmt: skip
    (out / "samples.json").write_text(json.dumps(summary, indent=1))
    return 0


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ckpt", required=True,
        help="checkpoint written by `vdiff fit` (e.g. runs/x/checkpoints/last.ckpt), or a `vdiff export` .safetensors",
    )
    parser.add_argument("--input", default=None, help="a video file, or shards (folder, manifest, brace pattern, glob)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--task",
        default=None,
        help="mask mode: prediction, backward, interpolation, unconditional, single_frame, ... (default: the model's validation task)",
    )
    parser.add_argument(
        "--given-frames", type=int, default=None, help="given frames for prediction/backward and rollouts"
    )
    parser.add_argument(
        "--num-frames",
        type=int,
        default=None,
        help="clip length per sampling window (default: the training clip length)",
    )
    parser.add_argument("--total-frames", type=int, default=None, help="roll out autoregressively to this many frames")
    add_size_argument(parser, None, "frame size (default: the training size)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's sampler steps)")
    parser.add_argument(
        "--sampler", default=None,
        help="ddim or ancestral (DDPM), euler or heun (EDM), flow_euler or flow_heun (flow matching) (default: the model's)",
    )
    parser.add_argument("--num-videos", type=int, default=4, help="clips to sample from the input")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ema", action="store_true", help="use the trained weights, not the EMA ones")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    svd = parser.add_argument_group("image to video (SVD checkpoints)")
    svd.add_argument("--image", default=None, help="an image file to animate")
    svd.add_argument("--frame", type=int, default=None, help="with --input VIDEO: animate this frame of the video")
    rate = svd.add_mutually_exclusive_group()
    rate.add_argument("--fps-id", type=float, default=None, help="SVD's fps_id (frames per second - 1; SVD: 6)")
    rate.add_argument(
        "--fps",
        type=float,
        default=None,
        help="frames per second (fps_id = fps - 1); default: the module's fps_id, else the input video's rate, else 7",
    )
    svd.add_argument(
        "--motion-bucket-id", type=float, default=None, help="motion bucket 0..255 (default: the module's, else 127)"
    )
    svd.add_argument(
        "--cond-aug",
        type=float,
        default=None,
        help="noise std on the conditioning frame (default: the module's, SVD 0.02)",
    )
    svd.add_argument(
        "--min-guidance", type=float, default=None, help="CFG scale at the first frame (default: the module's)"
    )
    svd.add_argument(
        "--max-guidance", type=float, default=None, help="CFG scale at the last frame (default: the module's)"
    )
    svd.add_argument("--decode-chunk", type=int, default=None, help="decode this many frames at a time (default: all)")
    svd.add_argument(
        "--decode-overlap", type=int, default=0, help="frames shared by consecutive decode chunks (cross-faded)"
    )
    vista = parser.add_argument_group("long rollouts (Vista checkpoints; --decode-chunk/--decode-overlap apply too)")
    vista.add_argument("--rounds", type=int, default=None, help="windows of T frames: T + (T - overlap)(N - 1) frames")
    vista.add_argument("--overlap", type=int, default=3, help="latents carried from one window to the next (Vista: 3)")
    vista.add_argument("--triangle-guidance", type=float, nargs=2, metavar=("MIN", "MAX"), default=None,
                       help="Vista's triangle-wave CFG in every window (Vista's rollouts: 1.0 2.5)")  # fmt: skip
    vista.add_argument("--actions", default=None,
                       help="JSON file of actions: one entry per round, or one for every round (module docstring)")  # fmt: skip
    vista.add_argument("--uncertainty", type=int, default=None, metavar="K",
                       help="print Vista's uncertainty reward from an ensemble of K samples of the first window")  # fmt: skip


def _training_setting(ckpt: dict, key: str):
    return ckpt.get("vdiff_clip", {}).get(key)


def run(args: argparse.Namespace) -> int:
    from vdiff.lit.module_loading import checkpoint_entries, checkpoint_module_class, load_module

    ckpt_path = Path(args.ckpt)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"vdiff sample: no checkpoint at {ckpt_path}")
    image_mode = args.image is not None or args.frame is not None
    if vista_requested(args) and args.frame is not None:
        raise ValueError("vdiff sample: --frame is for image-to-video; a rollout starts from --input or --image")
    if args.image is not None and args.input is not None:
        raise ValueError("vdiff sample: give --image FILE or --input VIDEO --frame N, not both")
    if args.frame is not None and args.input is None:
        raise ValueError("vdiff sample: --frame N needs --input VIDEO (the video to take frame N from)")
    if not image_mode and args.input is None:
        raise ValueError("vdiff sample: give --input (a video or shards), --image FILE, or --input VIDEO --frame N")
    size = args.size  # (H, W) or None (vdiff.data.frame_size)
    checkpoint = checkpoint_entries(ckpt_path)  # a .ckpt or an export's entries; refuses files that would run code
    checkpoint_module_class(checkpoint, ckpt_path)  # a weights file, or a class that cannot be imported: refused
    trained_frames = _training_setting(checkpoint, "num_frames")
    trained_size = _training_setting(checkpoint, "size")
    del checkpoint
    if trained_size is not None:
        trained_size = (
            (trained_size, trained_size)
            if isinstance(trained_size, int)
            else tuple(trained_size) * (2 // len(trained_size))
        )
    module = load_module(str(ckpt_path), map_location=args.device, use_ema=not args.no_ema)
    if vista_requested(args):
        return _run_vista(args, module, ckpt_path, args.num_frames or trained_frames, size or trained_size)
    if image_mode:
        return _run_image(args, module, ckpt_path, args.num_frames or trained_frames, size or trained_size)
    return _run_clips(args, module, ckpt_path, args.num_frames or trained_frames, size or trained_size)


def _run_clips(
    args: argparse.Namespace, module: Any, ckpt_path: Path, num_frames: int | None, size: tuple[int, int] | None
) -> int:
    from vdiff.data.video_io import encode_video

    if num_frames is None or size is None:
        raise ValueError(
            f"vdiff sample: {ckpt_path} does not record the training clip length/size; pass --num-frames and --size"
        )
    total = args.total_frames or num_frames
    read_frames = num_frames if total <= num_frames else (args.given_frames or module.evaluation.given_frames)
    keys, clips, rates, _ = _read_inputs(args.input, read_frames, size, args.num_videos)
    video = torch.stack([_to_video(c) for c in clips]).to(args.device)  # (B, T, 3, H, W)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)

    if total > num_frames:
        given = args.given_frames or module.evaluation.given_frames
        sample = module.rollout(
            video,
            total,
            window=num_frames,
            given_frames=given,
            sampler=args.sampler,
            steps=args.steps,
            generator=generator,
            progress=True,
        )
        given_frames = torch.zeros(sample.shape[:2], dtype=torch.bool, device=sample.device)
        given_frames[:, :given] = True
        target = None
    else:
        batch = {"video": video, "key": keys, "fps": torch.tensor(rates)}
        result = module.generate(
            batch,
            task=args.task,
            given_frames=args.given_frames,
            sampler=args.sampler,
            steps=args.steps,
            generator=generator,
            progress=True,
        )
        sample, given_frames, target = result.video, result.given_frames, result.target

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = unique_names(keys)  # output files are named after the keys, made safe (vdiff.data.names)
    for i, name in enumerate(names):
        fps = rates[i]
        (out / f"{name}-sample.mp4").write_bytes(encode_video(_to_frames(sample[i]), fps=fps))
        if target is not None:
            both = torch.cat([target[i], sample[i]], dim=-2)  # ground truth above sample
            (out / f"{name}.mp4").write_bytes(encode_video(_to_frames(both), fps=fps))
    write_grid(out / "grid.png", sample, given_frames)
    (out / "samples.json").write_text(
        json.dumps(
            {
                "checkpoint": str(ckpt_path),
                "keys": keys,
                "names": names,
                "frames": int(sample.shape[1]),
                "task": args.task or module.evaluation.task,
                "sampler": module.sampler_with(args.sampler, args.steps).describe(),
                "rollout": total > num_frames,
            },
            indent=1,
        )
    )
    print(f"wrote {len(keys)} samples of {sample.shape[1]} frames to {out}")
    return 0


def _run_image(
    args: argparse.Namespace, module: Any, ckpt_path: Path, num_frames: int | None, size: tuple[int, int] | None
) -> int:
    from vdiff.data.video_io import encode_video
    from vdiff.models.conditioners import fps_id_of

    if not isinstance(module, _svd_module_class()):
        raise ValueError(
            f"vdiff sample: --image/--frame need a checkpoint of a module with SVD's image conditioning (SVDModule); "
            f"{ckpt_path} holds a {type(module).__name__}: sample it with --input and --task"
        )
    if size is not None:
        check_size(module, size)  # before reading anything
    if args.image is not None:
        source, video_fps = Path(args.image), None
        image = read_image(source, size)
    else:
        source = Path(args.input)
        image, video_fps = read_video_frame(source, args.frame, size)
    size = tuple(image.shape[-2:])
    check_size(module, size)
    num_frames = int(num_frames or module.net_config.num_frames)
    if args.decode_chunk is not None and args.decode_chunk < 1:
        raise ValueError(f"vdiff sample: --decode-chunk must be >= 1, got {args.decode_chunk}")

    fps_id = fps_id_of(args.fps) if args.fps is not None else args.fps_id  # None: the module's, the video's, SVD's
    guidance = module.guidance_with(args.min_guidance, args.max_guidance)
    settings = module.image_to_video_settings(num_frames, fps_id, args.motion_bucket_id, args.cond_aug, guidance,
                                              source_fps=video_fps)  # fmt: skip
    sampler = module.sampler_with(args.sampler, args.steps)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    video = module.image_to_video(
        image[None], num_frames, settings.fps_id, settings.motion_bucket_id, settings.cond_aug, guidance,
        generator=generator, decode_chunk=args.decode_chunk, decode_overlap=args.decode_overlap, sampler=sampler,
        progress=True,
    )  # (1, T, 3, H, W)  # fmt: skip

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    key = source.stem if args.frame is None else f"{source.stem}-frame{args.frame}"
    mp4 = out / f"{safe_name(key)}-sample.mp4"
    mp4.write_bytes(encode_video(_to_frames(video[0]), fps=settings.fps))
    write_grid(out / "grid.png", video, torch.zeros(video.shape[:2], dtype=torch.bool))
    (out / "samples.json").write_text(
        json.dumps(
            {
                "checkpoint": str(ckpt_path),
                "keys": [key],
                "source": str(source),
                "frame": args.frame,
                "frames": num_frames,
                "size": {"height": size[0], "width": size[1]},
                "task": "image_to_video",
                "fps_id": settings.fps_id,
                "fps": settings.fps,
                "motion_bucket_id": settings.motion_bucket_id,
                "cond_aug": settings.cond_aug,
                "guidance": repr(settings.guidance),
                "sampler": sampler.describe(),
                "seed": args.seed,
                "decode_chunk": args.decode_chunk,
                "decode_overlap": args.decode_overlap,
            },
            indent=1,
        )
    )
    print(f"wrote {mp4} ({num_frames} frames at {size[1]}x{size[0]}, {settings.fps:g} fps)")
    return 0
