"""Pseudo-labels (teacher / student sources, the sharded labeling job, output formats) and self-training."""
