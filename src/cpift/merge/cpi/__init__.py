"""The CPI-FT steps: core masks (cores), their grouping (cluster), fusion (fuse), the mask file format
(masks) and the step recipes (recipes)."""
