"""cpift: model merging and CPI-FT with a streaming tensor core.

The subpackages live in the repository's top-level folders and are mapped into this namespace by
pyproject.toml: ``cpift.kernels`` (tensor core), ``cpift.merge`` (checkpoints and methods),
``cpift.training`` and ``cpift.cli``.
"""

__version__ = "0.1.0"
