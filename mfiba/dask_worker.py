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

It also shortens one log record. When a cluster closes, a worker's heartbeat can meet the
scheduler's closed stream (a race in distributed, dask/distributed#7192): distributed logs
"Failed to communicate with scheduler during heartbeat" at ERROR with two chained
tracebacks, at the end of a run that succeeded. HeartbeatRecord keeps that record as one
WARNING line naming the error; every other record, and this one's text, is unchanged.
"""
from __future__ import annotations

import atexit
import gc
import logging

HEARTBEAT_FAILED = "Failed to communicate with scheduler during heartbeat"


class HeartbeatRecord(logging.Filter):
    """distributed.worker's heartbeat failure as one WARNING line, without its tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and str(record.msg).startswith(HEARTBEAT_FAILED):
            error = record.exc_info[1] if record.exc_info else None
            cause = f": {type(error).__name__}: {error}" if error is not None else ""
            record.msg = (f"{record.getMessage().rstrip('.')}{cause} (expected while a cluster closes, "
                          "dask/distributed#7192; the worker retries or is closing)")
            record.args, record.exc_info, record.exc_text = (), None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def dask_setup(worker) -> None:
    # Registered when the worker starts, before its first task imports Prefect, which
    # registers its own exit handlers: atexit runs them last in, first out, so this one
    # runs after Prefect's drain.
    atexit.register(gc.freeze)
    worker_log = logging.getLogger("distributed.worker")
    if not any(isinstance(f, HeartbeatRecord) for f in worker_log.filters):
        worker_log.addFilter(HeartbeatRecord())
