"""Pseudo-labels and CAM refinement."""
