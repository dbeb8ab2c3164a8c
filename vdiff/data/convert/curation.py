"""SVD-style curation of source footage: scene-cut detection and a per-clip motion score.

* :class:`SceneCutDetector` feeds frames one at a time to a PySceneDetect detector
  (``AdaptiveDetector`` by default, or ``ContentDetector``) and reports the frame numbers at which a
  new scene starts. Frames come from our own decoder (so every input container PyAV reads works and
  frames are decoded once for cutting, scoring and encoding); the detector sees them at the output
  frame rate and size.
* :func:`motion_score` is the mean optical-flow magnitude of a clip (OpenCV Farneback) between frames
  ``1 / flow_fps`` seconds apart, computed on grey frames scaled so the shorter side is ``flow_size``
  pixels. Unit: pixels at that size per ``1 / flow_fps`` seconds, so scores compare across source
  resolutions and frame rates. A static shot scores about 0; a forward-driving camera scores several
  pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from scenedetect import FrameTimecode
from scenedetect.detector import FlashFilter
from scenedetect.detectors import AdaptiveDetector, ContentDetector

SCENE_DETECTORS: tuple[str, ...] = ("adaptive", "content", "none")
DEFAULT_FLOW_FPS = 2.0
DEFAULT_FLOW_SIZE = 128


class SceneCutDetector:
    """Streams frames through a PySceneDetect detector; ``push`` returns the indices of new scenes.

    ``kind``: ``"adaptive"`` (rolling-average ratio of the content score: robust to camera motion, the
    default) or ``"content"`` (fixed threshold on the HSV/edge content score). ``threshold`` is the
    detector's own (adaptive ratio, default 3.0; content score, default 27.0). ``min_scene_frames``
    suppresses a cut closer than that to the previous one. A cut at index ``c`` means frame ``c`` is
    the first frame of a new scene. A cut can be reported up to :attr:`latency` frames after the
    frame it names (the adaptive detector compares a frame with ``window_width`` frames after it).
    """

    def __init__(self, kind: str = "adaptive", fps: float = 10.0, threshold: float | None = None, min_scene_frames: int = 8):
        if kind not in ("adaptive", "content"):
            raise ValueError(f"scene detector must be 'adaptive' or 'content', got {kind!r}")
        self.fps = float(fps)
        if kind == "adaptive":
            self.detector = AdaptiveDetector(
                adaptive_threshold=3.0 if threshold is None else threshold, min_scene_len=int(min_scene_frames)
            )
        else:
            # SUPPRESS reports a cut at the frame it is seen (MERGE delays it by min_scene_len frames).
            self.detector = ContentDetector(
                threshold=27.0 if threshold is None else threshold,
                min_scene_len=int(min_scene_frames),
                filter_mode=FlashFilter.Mode.SUPPRESS,
            )
        self.latency = int(self.detector.event_buffer_length)
        self.count = 0

    def push(self, rgb: np.ndarray) -> list[int]:
        """Process the next ``(H, W, 3)`` uint8 RGB frame; returns cut indices found so far (sorted)."""
        bgr = np.ascontiguousarray(rgb[..., ::-1])  # PySceneDetect expects OpenCV's BGR order
        timecode = FrameTimecode(self.count, fps=self.fps)
        self.count += 1
        cuts = self.detector.process_frame(timecode, bgr)
        return sorted(int(c.frame_num) for c in cuts if int(c.frame_num) > 0)

    def finish(self) -> list[int]:
        """Cuts the detector still holds after the last frame."""
        if self.count == 0:
            return []
        cuts = self.detector.post_process(FrameTimecode(self.count - 1, fps=self.fps))
        return sorted(int(c.frame_num) for c in cuts if int(c.frame_num) > 0)


def detect_scene_cuts(
    frames: np.ndarray | Sequence[np.ndarray],
    fps: float,
    kind: str = "adaptive",
    threshold: float | None = None,
    min_scene_frames: int = 8,
) -> list[int]:
    """Indices of the first frame of every new scene in ``frames`` ``(T, H, W, 3)`` uint8 RGB."""
    detector = SceneCutDetector(kind, fps, threshold, min_scene_frames)
    cuts: list[int] = []
    for frame in frames:
        cuts.extend(detector.push(frame))
    cuts.extend(detector.finish())
    return sorted(set(cuts))


def _grey_small(rgb: np.ndarray, flow_size: int) -> np.ndarray:
    """Grey uint8 frame, shrunk (never enlarged) so its shorter side is ``flow_size``."""
    grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    h, w = grey.shape
    scale = flow_size / min(h, w)
    if scale < 1.0:
        grey = cv2.resize(grey, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return grey


def motion_score(
    frames: np.ndarray | Sequence[np.ndarray],
    fps: float,
    flow_fps: float = DEFAULT_FLOW_FPS,
    flow_size: int = DEFAULT_FLOW_SIZE,
) -> float:
    """Mean Farneback optical-flow magnitude of a clip ``(T, H, W, 3)`` uint8 RGB at ``fps``.

    Frames ``round(fps / flow_fps)`` apart are compared (the first and last when the clip is shorter);
    the flow is computed at a shorter side of ``min(flow_size, H, W)`` pixels and its magnitude is
    expressed in pixels at a shorter side of ``flow_size``, per ``1 / flow_fps`` seconds.
    """
    count = len(frames)
    if count < 2:
        raise ValueError(f"motion_score needs at least 2 frames, got {count}")
    step = max(1, int(round(fps / flow_fps)))
    picks = list(range(0, count, step))
    if len(picks) < 2:
        picks = [0, count - 1]
        step = count - 1
    seconds_per_pair = step / fps
    magnitudes = []
    previous = _grey_small(frames[picks[0]], flow_size)
    for i in picks[1:]:
        current = _grey_small(frames[i], flow_size)
        flow = cv2.calcOpticalFlowFarneback(previous, current, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        magnitudes.append(float(np.sqrt((flow**2).sum(axis=-1)).mean()))
        previous = current
    # Pixels at the working size -> pixels at a shorter side of flow_size, per 1/flow_fps seconds.
    working_short = min(previous.shape)
    to_reference = flow_size / working_short
    per_period = (1.0 / flow_fps) / seconds_per_pair
    return float(np.mean(magnitudes) * to_reference * per_period)
