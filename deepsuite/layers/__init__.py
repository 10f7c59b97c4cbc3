"""Single-device, pure layers (no torch.distributed, no rank, no globals). Exports filled at integration."""
