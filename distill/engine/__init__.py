"""Training engine shared by the students (train loop, checkpoints, devices)."""
