"""CLIP-ES (distill/cam/): CAM seeds and refined pseudo masks from image-level labels with the frozen teacher.

Lin et al., "CLIP is Also an Efficient Segmenter: A Text-Driven Approach for Weakly Supervised
Semantic Segmentation", CVPR 2023 (paper sections cited as "CLIP-ES 3.x"; "repo" is the authors'
code, github.com/linyq2117/CLIP-ES, generate_cams_voc12.py / clip/model.py / eval_cam_with_crf.py).

Pipeline for one image with present classes ``k = 1..K`` (image-level labels):

1. Text side (CLIP-ES 3.2): class embeddings (prompt ensemble, ``distill.teacher.text``) and the
   embeddings of background words (``cam.background``, one a line).
2. Softmax Grad-CAM (CLIP-ES 3.2, eq. 2-4): ``logits = 100 * cos(image, [present classes, bg words])``,
   softmax across them; Grad-CAM of each present class's softmax score at the input norm of the
   last block (``resblocks[-1].ln_1``) over patch tokens, ReLU, min-max normalisation (relative:
   the repo's absolute 1e-7 epsilon erases a saturated softmax's map, see :func:`normalize_cam`).
   Efficient: blocks ``1..L-1`` run once per image (no grad), the last block runs on a batch that
   holds one row per (image, present class); the per-row scores are summed so ONE backward gives
   every class's gradient in its own row.
3. Class-aware attention affinity (CLIP-ES 3.3): attention of the last 8 blocks (patch-to-patch,
   heads averaged) -> alternating column/row normalisation (Sinkhorn, 3 rounds) -> symmetrise ->
   raised to ``cam.caa_power`` (2, squared, in the repo) -> restricted to the boxes around the CAM above 0.4 of its max -> ``refined = A @ cam``.
4. Masks (CLIP-ES 3.4 and eval_cam_with_crf.py): background = ``(1 - max_k cam_k) ** bg_power`` (or
   a fixed threshold), argmax, optional dense CRF, confidence-guided ignore: pixels whose
   confidence is below ``conf_thresh`` (0.95) become 255.

Images are resized before the teacher sees them (their size need not be a multiple of the patch
size): ``cam.resize=square`` resizes every image to ``cam.image_size`` (0 = the teacher's
``dense_image_size``) so that a batch can be stacked; ``cam.resize=patch_multiple`` follows the
repo (aspect ratio kept, each side rounded UP to a multiple of the patch size; ``cam.image_size``
0 keeps the original scale as the repo does, else the longer side is scaled to it). Position
embeddings are interpolated to the token grid by the teacher's ViT helpers
(``distill.teacher.vit.embed_tokens``, bicubic; the repo's ``upsample_pos_emb`` is bilinear). The
CAMs are resized back to the original image size, so masks always have the image's size.

Outputs (``cam.out``): ``seeds/{split}/{stem}.npz`` (``category_ids``, patch-level ``gradcam`` and,
with ``cam.caa``, ``refined`` CAMs, ``size``), ``masks/{split}/{stem}.png`` (uint8, category id, 0 = background,
255 = ignore; the world's semantic PNG convention), ``panels/{split}/{stem}.png``,
``summary.json``; the ablation writes ``metrics.json``.
"""

