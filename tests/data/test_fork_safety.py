"""Decoding stays safe in forked processes, whatever the parent decoded or converted before the fork.

PyAV >= 17 converts pixels through one swscale context per Python thread with a pool of slice threads; a
fork hands the child that context without its threads, and with av 18.1.1 the child's next conversion
through it waits forever. vdiff's decoding and encoding convert through contexts of their own with one
thread, so a loader worker or a process pool forked from a parent that decoded (with vdiff, or with PyAV's
own ``to_ndarray``) decodes and encodes normally. Each scenario runs in a fresh interpreter under a hard
time limit, so a regression fails in seconds instead of hanging the suite.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(180)

SETUP = """
import io, os, sys
import av
import numpy as np
from vdiff.data import video_io

rng = np.random.default_rng(0)
FRAMES = (rng.random((12, 64, 48, 3)) * 255).astype(np.uint8)
MP4 = video_io.encode_video(FRAMES, fps=10)
EXPECTED = video_io.decode_frames(MP4, [1, 4, 7], size=(32, 24))

def pyav_own_conversion():
    # What a user's code or another library may do in the parent: PyAV's per-thread, thread-pooled context.
    with av.open(io.BytesIO(MP4)) as container:
        for frame in container.decode(video=0):
            frame.to_ndarray(format="rgb24", width=24, height=32)

def work(_=None):
    got = video_io.decode_frames(MP4, [1, 4, 7], size=(32, 24))
    assert np.array_equal(got, EXPECTED)
    assert video_io.decode_all(MP4).shape == (12, 64, 48, 3)
    assert len(video_io.encode_video(FRAMES[:4], fps=10)) > 0
    return int(got.sum())

pyav_own_conversion()
work()  # the parent has decoded, converted and encoded before any fork
"""

SCENARIOS = {
    "dataloader": """
import torch
class Clips(torch.utils.data.Dataset):
    def __len__(self): return 4
    def __getitem__(self, i): return work()
loader = torch.utils.data.DataLoader(Clips(), batch_size=2, num_workers=2, multiprocessing_context="fork")
assert len(list(loader)) == 2
""",
    "multiprocessing_pool": """
from vdiff.data.convert import parallel_map
assert len(list(parallel_map(work, list(range(4)), workers=2))) == 4
""",
    "process_pool_executor": """
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
    assert len(list(pool.map(work, range(4)))) == 4
""",
    "bare_fork": """
pid = os.fork()
if pid == 0:
    work()
    os._exit(0)
_, status = os.waitpid(pid, 0)
assert status == 0, status
""",
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_forked_children_decode_after_the_parent_did(scenario):
    code = textwrap.dedent(SETUP) + textwrap.dedent(SCENARIOS[scenario]) + "\nprint('decoded in forked children')\n"
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the stuck forked children too, not only the parent
        process.communicate()
        pytest.fail(f"{scenario}: forked children did not finish decoding within 60 s (swscale threads lost in the fork?)")
    assert process.returncode == 0, err[-3000:]
    assert "decoded in forked children" in out


def test_frame_converter_matches_pyav_conversion():
    """The single-threaded converter gives the bytes PyAV's own conversion gives (bilinear, same colour maths)."""
    import io

    import av
    import numpy as np

    from vdiff.data import video_io

    rng = np.random.default_rng(1)
    mp4 = video_io.encode_video((rng.random((3, 64, 48, 3)) * 255).astype(np.uint8), fps=10)
    convert = video_io.FrameConverter()
    with av.open(io.BytesIO(mp4)) as container:
        for frame in container.decode(video=0):
            assert np.array_equal(convert.rgb(frame), frame.to_ndarray(format="rgb24"))
            ours = convert.rgb(frame, (32, 24))
            assert ours.shape == (32, 24, 3)
            assert np.array_equal(ours, frame.to_ndarray(format="rgb24", width=24, height=32))
