"""Segmentation students: LSeg (lseg.py), CLIPSeg (clipseg.py), their builders (build.py),
losses (losses.py), training (train.py) and inference (infer.py); the ablation is distill/ablate/seg.py."""
