"""The engine every stage runs on: the context (task + data + device + cache + process group),
augmentation, models, label sources, the one training loop and the runtime (devices, precision,
process groups)."""
