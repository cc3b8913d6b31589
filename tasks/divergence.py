"""Shared by the training loops: skip a batch whose loss is not finite, stop on a run of them."""
from __future__ import annotations

import torch


class DivergenceGuard:
    def __init__(self, what: str, log, patience: int = 20):
        self.what, self.log, self.patience, self.bad = what, log, patience, 0

    def finite(self, loss: torch.Tensor, parts: dict, step: int) -> bool:
        """True to go on with this batch; False to skip it. Raises after `patience` in a row."""
        if torch.isfinite(loss):
            self.bad = 0
            return True
        self.bad += 1
        self.log(f"non-finite loss at step {step} skipped: { {k: float(v) for k, v in parts.items()} }")
        if self.bad > self.patience:
            raise FloatingPointError(f"{self.what} training diverged at step {step}")
        return False
