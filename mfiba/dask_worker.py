"""Preloaded into every worker of the local Dask cluster (`distributed.worker.preload`, set
by `flows.common.dask_task_runner`). Workers of an external cluster can take it too:
`dask worker ADDRESS --preload mfiba.dask_worker`.

Why: a worker that has run a stage holds about a million garbage-collected objects, most of
them the code it imported (torch, torchvision, Prefect, pandas, distributed: about 560,000
after the imports alone). At exit, after Prefect has drained its log and event queues, the
interpreter walks all of them twice (a garbage collection before and one after clearing the
modules). Measured here at the end of the demo's evaluate stage (990,000 objects): 1.1 to
1.8 s per walk, so the worker outlived the nanny's 4-second close deadline and was killed
("Worker process still alive after 4.0 seconds, killing"). With the heap frozen by the last
exit handler, both walks skip it: a process holding those imports exited in 0.37 s instead
of 2.0 s. The cost is that reference cycles still alive at exit are not collected, so their
finalisers do not run; this project's writes are closed (and atomic) when a task ends.
"""
from __future__ import annotations

import atexit
import gc


def dask_setup(worker) -> None:
    # Registered when the worker starts, before its first task imports Prefect, which
    # registers its own exit handlers: atexit runs them last in, first out, so this one
    # runs after Prefect's drain.
    atexit.register(gc.freeze)
