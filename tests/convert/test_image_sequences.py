"""``vdiff data shards --image-sequences``: a folder of frames (SVD-MV's orbital renders) -> one clip at --fps, in
natural file order, shrunk like videos; broken and mixed-size sequences are skipped and counted by reason; resumable;
auto-detected when the tree holds no video."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from tests.convert.helpers import frame_index_from_level, indexed_video, moving_video, read_shard_set
from vdiff.cli import main
from vdiff.data.convert import folder
from vdiff.data.convert.folder import BROKEN_IMAGE, MIXED_SIZES, ClipOptions, build_folder_shards, natural_key
from vdiff.data.schema import Manifest
from vdiff.data.video_io import encode_video

VIEWS = 21
STEP = 8  # brightness step between frames: frame k is about 8 + 8k


def write_sequence(folder, frames: np.ndarray, pattern: str = "view_{}.png", alpha: np.ndarray | None = None):
    """One image file per frame, named so that plain string order is wrong (view_10 before view_2)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, frame in enumerate(frames):
        image = Image.fromarray(frame) if alpha is None else Image.fromarray(np.dstack([frame, alpha]), "RGBA")
        image.save(folder / pattern.format(k))
    return folder


def renders(tmp_path):
    """A tree of object folders: two good orbits (png, jpg), a nested webp one, an RGBA one, and bad ones."""
    root = tmp_path / "renders"
    orbit = indexed_video(VIEWS, height=48, width=64, level_step=STEP)
    write_sequence(root / "objA", orbit)
    write_sequence(root / "objB", orbit, pattern="{}.jpg")
    write_sequence(root / "group" / "objC", orbit, pattern="frame{:03d}.webp")
    alpha = np.full((48, 64), 255, dtype=np.uint8)
    alpha[:, :16] = 0  # transparent background on the left: white after compositing
    write_sequence(root / "objRGBA", orbit, alpha=alpha)
    write_sequence(root / "short", orbit[:5])
    broken = write_sequence(root / "broken", orbit)
    data = (broken / "view_7.png").read_bytes()
    (broken / "view_7.png").write_bytes(data[: len(data) // 2])  # truncated PNG
    write_sequence(root / "mixed", orbit)
    Image.fromarray(indexed_video(1, height=40, width=64)[0]).save(root / "mixed" / "view_3.png")
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not an image")
    return root


def test_each_folder_becomes_one_clip_in_natural_order(tmp_path):
    root = renders(tmp_path)
    options = ClipOptions(clip_frames=VIEWS, max_side=32, motion=True)
    report = build_folder_shards(root, tmp_path / "out", options, image_sequences=True)
    samples = read_shard_set(tmp_path / "out")
    by_input = {meta.extra["input"]: (frames, meta) for frames, meta in samples.values()}
    assert sorted(by_input) == ["group/objC", "objA", "objB", "objRGBA"]
    for rel, (frames, meta) in by_input.items():
        assert frames.shape == (VIEWS, 24, 32, 3)  # 48x64 shrunk to max side 32, even sides
        assert meta.fps == folder.DEFAULT_SEQUENCE_FPS == 8.0 and meta.num_frames == VIEWS
        assert meta.extra["first_frame"] == 0 and meta.extra["scene"] == 0
        assert np.isfinite(meta.extra["motion_score"]) and meta.extra["motion_fps"] == 2.0
        if rel != "objRGBA":  # frame k of the clip is view k (brightness encodes the view)
            assert [frame_index_from_level(f, level_step=STEP) for f in frames] == list(range(VIEWS)), rel
    assert by_input["objA"][1].extra["images"] == [f"view_{k}.png" for k in range(VIEWS)]
    assert by_input["group/objC"][1].extra["images"][:2] == ["frame000.webp", "frame001.webp"]
    left = by_input["objRGBA"][0][:, :, :6].astype(int)  # transparent columns 0-15 of 64 -> 0-7 of 32
    assert left.mean() > 245
    failed = {rel: reason for rel, reason, _ in report.failed}
    assert failed == {"broken": BROKEN_IMAGE, "mixed": MIXED_SIZES}
    messages = " ".join(message for _, _, message in report.failed)
    assert "view_7.png" in messages and "view_3.png" in messages
    assert report.dropped["too_short"] == 1  # the 5-view folder
    assert report.inputs_found == 7 and report.clips_kept == 4
    assert "2 failed (broken_image 1, mixed_sizes 1)" in report.summary()


def test_fps_resume_and_auto_detection(tmp_path):
    root = tmp_path / "renders"
    orbit = indexed_video(VIEWS, height=32, width=32, level_step=STEP)
    write_sequence(root / "a", orbit)
    write_sequence(root / "b", orbit)
    options = ClipOptions(clip_frames=VIEWS, fps=12.0, motion=False)
    first = build_folder_shards(root, tmp_path / "out", options, commit_every=1)  # auto: no video in the tree
    assert (first.inputs_found, first.clips_kept) == (2, 2)
    assert {m.fps for _, m in read_shard_set(tmp_path / "out").values()} == {12.0}
    write_sequence(root / "c", orbit)
    again = build_folder_shards(root, tmp_path / "out", options)
    assert (again.inputs_skipped, again.inputs_converted, again.clips_kept, again.total_clips) == (2, 1, 1, 3)
    state = json.loads((tmp_path / "out" / folder.STATE_NAME).read_text())
    assert sorted(state["done"]) == ["a", "b", "c"] and Manifest.load(tmp_path / "out").num_samples == 3
    # With a video in the tree, image folders are inputs only when asked for.
    (root / "clip.mp4").write_bytes(encode_video(moving_video(1, VIEWS, height=32, width=32), 10.0))
    only_video = build_folder_shards(root, tmp_path / "video_only", options)
    assert only_video.inputs_found == 1
    both = build_folder_shards(root, tmp_path / "both", options, image_sequences=True)
    assert both.inputs_found == 4 and both.clips_kept == 4
    assert build_folder_shards(root, tmp_path / "none", options, image_sequences=False).inputs_found == 1


def test_cli_and_natural_order(tmp_path, capsys):
    assert sorted(["v10.png", "v2.png", "v1.png", "V3.png"], key=natural_key) == [
        "v1.png",
        "v2.png",
        "V3.png",
        "v10.png",
    ]
    root = tmp_path / "renders"
    orbit = indexed_video(VIEWS, height=32, width=32, level_step=STEP)
    write_sequence(root / "obj", orbit)
    code = main(["data", "shards", str(root), "--out", str(tmp_path / "out"), "--image-sequences", "--clip-frames",
                 str(VIEWS), "--fps", "8", "--no-motion"])  # fmt: skip
    assert code == 0
    assert "1 found, 1 converted now" in capsys.readouterr().out
    ((frames, meta),) = read_shard_set(tmp_path / "out").values()
    assert frames.shape[0] == VIEWS and meta.fps == 8.0 and "motion_score" not in meta.extra
