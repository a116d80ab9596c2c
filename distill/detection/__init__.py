"""The ViLD student: an open-vocabulary Faster R-CNN distilled from the CLIP teacher.

- :mod:`distill.detection.vild` - head, losses, ensemble (pure tensors);
- :mod:`distill.detection.build` - ``build_vild_detector``, ``build_plain_detector``, ``load_detector``;
- :mod:`distill.detection.proposals` - class-agnostic proposals + teacher region embeddings;
- :mod:`distill.detection.train` - ``train_detector(cfg)`` (``distill train det``);
"""
