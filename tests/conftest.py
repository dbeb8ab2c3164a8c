"""Project-wide test settings.

Tests run tiny tensors, for which torch's intra-op threads cost far more than they bring on the
2-core CI machine (measured: elementwise ops on 16k elements ~1000x slower with 2 threads under
load). ``VDIFF_TEST_THREADS`` overrides the count.
"""

import atexit
import os
import shutil
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# No test sees the developer's Hugging Face cache (recipes name hf:// ids: a cached SVD would be loaded) or token.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="vdiff-tests-hf-")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], True)
for _name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "VDIFF_WEIGHTS_CACHE"):
    os.environ.pop(_name, None)
SLOW_TEST_TIMEOUT = 1800  # seconds; the default tests' limit is pyproject's ``timeout``
torch.set_num_threads(int(os.environ.get("VDIFF_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _restore_environment():
    """Every test leaves os.environ as it found it: Lightning's launchers set RANK/LOCAL_RANK/MASTER_PORT...
    in the parent process, and a later test's `vdiff` subprocess would believe it is a rank of a job."""
    saved = dict(os.environ)
    yield
    for name in [k for k in os.environ if k not in saved]:
        del os.environ[name]
    os.environ.update(saved)


def pytest_collection_modifyitems(config, items):
    """Slow tests (whole training runs) get SLOW_TEST_TIMEOUT unless they set their own limit."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TEST_TIMEOUT))
