"""The training engine: optimizer and schedule, checkpoints, metrics, system setup and the trainer."""
