"""Model I/O: checkpoints read a tensor at a time, the stream every step iterates, the shard writer,
resume journals, dry-run plans and device staging."""
