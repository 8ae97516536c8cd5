"""Checkpoints and merge methods: streaming over sharded safetensors with bounded memory."""
