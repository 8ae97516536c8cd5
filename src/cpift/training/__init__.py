"""Training: SFT with exact core freezing (data, freeze, sft, evaluate) and the CPI-FT pipeline.

Import the modules themselves (``from cpift.training.sft import sft``): this package imports
nothing heavy, so the CLI starts without loading transformers.
"""
