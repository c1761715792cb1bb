"""What requests bring from outside (input images, LoRA files): fetched under one set of
destination rules, bounded in time and size, and checked before a worker needs them."""
