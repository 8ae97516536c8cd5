"""mergekit-style YAML configs: loading and validation (config; the validated form in spec, file-free
checks in checks, the tokenizer fields in tokenizers), parameter values (values), the plan that turns a
config into a method call (plan), running it (run), and passthrough layer stacks (stack)."""
