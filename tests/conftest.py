"""Project-wide test settings.

Tests run tiny tensors, for which torch's intra-op threads cost far more than they bring on the
2-core CI machine (measured: elementwise ops on 16k elements ~1000x slower with 2 threads under
load). ``VDIFF_TEST_THREADS`` overrides the count.
"""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(int(os.environ.get("VDIFF_TEST_THREADS", "1")))
