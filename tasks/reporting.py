"""What every report shares: figures written as PNG files (atomically, any fsspec URL) and
Markdown tables."""
from __future__ import annotations

import io
import math

import numpy as np


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> str:
    from storage.urls import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def md_cell(v, digits: int = 3) -> str:
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return "n/a"
        small, large = abs(v) < 10 ** -digits and v != 0, abs(v) >= 1e7  # exponents, not 33 digits
        return f"{v:.3g}" if small or large else f"{v:.{digits}f}"
    return str(v).replace("|", "/").replace("\n", " ")


def md_table(frame, digits: int = 3) -> str:
    if frame is None or frame.empty:
        return "_(none)_"
    head = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(md_cell(v, digits) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])
