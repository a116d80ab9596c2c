"""Segmentation students: LSeg (lseg.py), CLIPSeg (clipseg.py), their losses (losses.py),
training (train.py), inference (infer.py) and the shapes ablation (ablation.py)."""
