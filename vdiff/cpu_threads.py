"""How vdiff's commands share the CPU cores with other processes.

PyTorch runs its CPU kernels on OpenMP threads, one per core (libgomp in the Linux wheels). By default a libgomp
thread that has finished its part of a kernel spins (about 300,000 turns) waiting for the next one. On a machine
where other processes want the cores too, the spinning thread holds a core that another process needs while its
partner thread waits to be scheduled, and every kernel then waits for a scheduler time slice. On 2 cores the
quickstart VDT trained 5-8x slower with the default than with passive waits whenever other processes were running
(``benchmarks/quickstart.py --background N`` measures it): with waiting threads that sleep at once
(``OMP_WAIT_POLICY=PASSIVE``) it kept within ~15% of one thread running alone on the core left free.

:func:`share_cores_fairly` sets that policy for the ``vdiff`` command before PyTorch is imported (the OpenMP runtime
reads it when it loads). A wait policy the user chose (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``) is kept:
``GOMP_SPINCOUNT=300000 vdiff fit ...`` restores libgomp's own default (spin, then sleep).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

WAIT_POLICY_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def share_cores_fairly(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` in ``environ`` unless a wait policy is already set there. Call it before
    ``import torch``; child processes (data loader workers, renderers) inherit it. Returns whether it set it."""
    if any(name in environ for name in WAIT_POLICY_VARIABLES):
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
