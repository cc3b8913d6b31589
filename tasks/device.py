"""Which torch device a configuration's `device` means in this process."""
from __future__ import annotations


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
        return str(w.name or w.address)
    except ValueError:  # not inside a worker
        return "local"
