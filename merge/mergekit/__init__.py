"""mergekit-style YAML configs: loading and validation (config), parameter values (values), and the
plan that turns a config into method calls (plan)."""
