"""Thread control for reductions whose result must not depend on torch's thread count."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def serial_reductions() -> Iterator[None]:
    """Run the enclosed torch CPU reductions on one thread, so their result does not depend on the
    thread count. torch's (MKL's) dot and sum split a vector among threads and add the partial sums
    in another order, so SLERP's norms and dot product, and through them its coefficients and some
    output bits, would change with --threads. One thread is also faster here: the reduction reads
    two vectors once, and thread barriers stall when another process holds a core (5x measured on
    2 shared cores).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
