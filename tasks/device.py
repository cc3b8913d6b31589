"""Which torch device a configuration's `device` means in this process."""
from __future__ import annotations

import threading

# One torch computation at a time per process. A Dask worker's threads share its cached task
# model and codecs, whose calls swap modules in and out of the network (branch selection,
# PassReuse) and set process-wide torch state (thread count, deterministic flag); in between
# another thread's computation would run through the wrong modules or with another thread
# count (other float sums: with random-init heads, other detections). For parallel compute
# use more worker processes (dask.n_workers), not more threads.
COMPUTE_LOCK = threading.RLock()


def set_torch_threads(threads: int) -> None:
    """A task's intra-op thread count, never changed under another thread's computation."""
    import torch

    with COMPUTE_LOCK:
        torch.set_num_threads(threads)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is visible to this process "
                           "(set device: cpu or auto, or run on a GPU worker)")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    return device


def worker_name() -> str:
    """The Dask worker running the current task (for logs and summaries)."""
    try:
        from distributed import get_worker

        w = get_worker()
        return str(w.address if w.name in (None, "") else w.name)  # a LocalCluster names its first worker 0
    except ValueError:  # not inside a worker
        return "local"
