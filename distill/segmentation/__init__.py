"""Segmentation students: LSeg (lseg.py), CLIPSeg (clipseg.py), their losses (losses.py),
training (train.py) and inference (infer.py); the ablation is distill/ablate/seg.py."""
