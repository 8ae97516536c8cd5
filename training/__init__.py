"""SFT with exact core freezing and the CPI-FT pipeline (not built yet: see the training issue)."""
