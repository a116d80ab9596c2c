"""MaskCLIP+ (Zhou, Loy, Dai, "Extract Free Dense Labels from CLIP", ECCV 2022, section 3.3),
zero-shot: a segmenter trained with cross entropy over ALL classes, seen and unseen, where the
pixels whose ground truth is an unseen class (suppressed: their class is not given, only that they
are not seen) get pseudo-labels, first from MaskCLIP, then from the segmenter itself.

As the reference does it (the copy at github.com/volgachen/MaskCLIP,
``mmseg/models/decode_heads/maskclip_plus_head.py``, ``forward_train`` and ``assign_label``; the
zero-shot configs ``configs/maskclip_plus/zero_shot/*``: ``start_clip_guided=(1, 1999)``,
``start_self_train=(2000, -1)`` of 20k iterations, ``clip_unlabeled_cats = unlabeled_cats =
suppress_labels``):

- *CLIP-guided* steps (the first ``clip_fraction`` of training, 2000 / 20000 in the reference):
  a suppressed pixel takes the arg-max of the MaskCLIP prediction (refined by key smoothing /
  prompt denoising where the teacher config asks, :func:`distill.teacher.dense.maskclip_refine`)
  over the unseen classes only;
- *self-training* steps (the rest): the arg-max of the segmenter's own prediction (detached) over
  the unseen classes.

Seen pixels keep their ground truth; ignored pixels (255) stay ignored. No confidence threshold:
the reference's ``conf_thresh`` is 0 in every released zero-shot config.
"""

from __future__ import annotations

import torch

from distill.engine.hooks import Hook
from distill.errors import DistillError
from distill.segmentation.losses import IGNORE


class MaskClipPlusLabels(Hook):
    """Fills the suppressed pixels of a training target (see the module docstring).

    Args:
        teacher: the frozen teacher (MaskCLIP runs on its dense tower).
        unseen_text: (U, D) text embeddings of the unseen classes.
        unseen_ids: (U,) their semantic-mask values (what marks a suppressed pixel).
        unseen_channels: (U,) their channels in the segmenter's logits (1 + vocabulary row).
        clip_steps: steps guided by MaskCLIP; later steps self-train.
        key_smoothing, prompt_denoising: MaskCLIP refinements (``teacher.*``; 0 = off).

    A training-loop hook: it follows ``loop.step`` (also after ``--resume``), so the model's forward
    asks it for the current phase through :meth:`__call__`.
    """

    def __init__(self, teacher, unseen_text: torch.Tensor, unseen_ids, unseen_channels, clip_steps: int,
                 key_smoothing: float = 0.0, prompt_denoising: float = 0.0):
        if len(unseen_ids) == 0:
            raise DistillError("seg.maskclip_plus: the vocabulary has no unseen (novel) classes to pseudo-label")
        self.teacher = teacher
        self.text = unseen_text.detach().float()
        self.ids = torch.as_tensor(list(unseen_ids), dtype=torch.long)
        self.channels = torch.as_tensor(list(unseen_channels), dtype=torch.long)
        self.clip_steps = int(clip_steps)
        self.refine = dict(key_smoothing=key_smoothing, prompt_denoising=prompt_denoising)
        self.step = 0
        self.suppressed_pixels = 0  # seen so far (0 at the end: the masks keep no unseen ids)

    def before_train(self, loop) -> None:
        self.step = loop.step

    def after_step(self, loop) -> None:
        self.step = loop.step

    @property
    def phase(self) -> str:
        return "clip" if self.step < self.clip_steps else "self"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, masks: torch.Tensor, target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1]; masks (B, H, W) semantic ids; target (B, H, W) channel
        indices (suppressed pixels ignored); logits (B, 1 + C, H, W) the segmenter's, detached.
        Returns the target with the suppressed pixels filled."""
        suppressed = torch.isin(masks, self.ids.to(masks.device))
        self.suppressed_pixels += int(suppressed.sum())
        if not bool(suppressed.any()):
            return target
        target = target.masked_fill(suppressed, IGNORE)  # their ids are in the vocabulary: never their labels
        if self.phase == "clip":
            from distill.teacher.dense import maskclip_scores

            scores = maskclip_scores(self.teacher, images, self.text, out_size=tuple(masks.shape[-2:]), **self.refine)
            pick = scores.to(masks.device).argmax(1)  # (B, H, W) index into the unseen classes
        else:
            pick = logits[:, self.channels.to(logits.device)].argmax(1)
        return torch.where(suppressed, self.channels.to(target.device)[pick], target)
