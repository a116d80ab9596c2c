"""Data: the shapes world (world.py), COCO-format detection data (coco.py), semantic segmentation
data (semseg.py), robust image decoding (images.py) and train augmentations (transforms.py)."""
