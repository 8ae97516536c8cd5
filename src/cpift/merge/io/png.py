"""A matplotlib figure written as a PNG, atomically (merge/io/publish.py), for the plots of cluster
and the bench."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Iterable

from cpift.merge.io.publish import write_atomic


def write_png(fig: Any, path: str | os.PathLike, *, dpi: int, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Render ``fig`` to PNG bytes, close it, and write them to ``path`` (never over an input)."""
    import matplotlib.pyplot as plt

    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return write_atomic(path, png.getvalue(), inputs=inputs)
