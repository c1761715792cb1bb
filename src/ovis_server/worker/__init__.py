"""The GPU worker: a process that owns one device and one loaded pipeline."""
