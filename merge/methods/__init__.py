"""The merge methods, one file per family (linear, slerp, the delta methods), each a typed function
over model directories; ``cpift.merge.methods.ties`` etc. are the functions themselves."""

from .delta import dare_linear, dare_ties, task_arithmetic, ties
from .average import linear
from .spherical import slerp

__all__ = ["linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties"]
