"""Pseudo-labels (teacher / student sources, colour candidates, filtering, the sharded labeling job and
its output folder, output formats, quality against hidden ground truth) and self-training."""
