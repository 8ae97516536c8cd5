"""The tensor core: every operation as a plain-torch reference (CPU default) behind one function.

One operation per module (``slerp``, ``linear``, ``select``, ``dare``, ``ties``, ``finite``); import
from the module, e.g. ``from cpift.kernels.slerp import slerp``. Nothing is re-exported here, so a
module name never gets shadowed by the function of the same name.

This package imports nothing of cpift, so it can be lifted out and tested alone.
"""
