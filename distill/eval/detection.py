"""COCO box and mask evaluation in the generalized open-vocabulary setting.

Every detection competes over the whole vocabulary (base and novel classes together): the COCO
evaluation runs once over all categories, and the base / novel numbers are the per-category
precision of that single run averaged over the categories of each split. This is how OV-COCO
results are reported (OVR-CNN, Zareian et al. CVPR 2021, section 4; ViLD, Gu et al. ICLR 2022,
section 4.1 "generalized" setting): the novel AP is *not* obtained by evaluating novel detections
against novel ground truth in isolation.

Box numbers come from a streaming implementation of COCOeval's bbox algorithm
(:mod:`distill.eval.coco_stream`, ``backend="stream"``, the default for boxes): it keeps the
ground truth as flat arrays and, per detection, only its score and its match at each IoU threshold,
so its memory stays flat as the images grow. Masks are evaluated with faster-coco-eval
(``COCOeval_faster``, ``backend="faster"``); ``backend="pycocotools"`` runs the reference
implementation on the same inputs. The tests show the three agree to 1e-6.

Metric names (values are fractions in [0, 1]; ``-1`` means undefined, i.e. no ground truth in that
split, as COCO reports it):

- ``bbox/AP``, ``bbox/AP50``, ``bbox/AP75``: over all categories with ground truth;
- ``bbox/AP_base``, ``bbox/AP_novel``, ``bbox/AP50_base``, ``bbox/AP50_novel``;
- ``bbox/AP50/<class name>`` for every category with ground truth;
- ``segm/...`` likewise when masks are evaluated.

At most ``max_dets`` detections per image are kept (the highest scores), as the COCO protocol
asks; COCO area range "all" is used throughout.

Ground truth is checked before anything is computed, by the project's COCO validator
(:func:`distill.eval.gt.load_gt`, :func:`distill.data.coco.validate_coco`): ids are integers (a
string id is an error saying so: pycocotools and faster-coco-eval disagree on them), and boxes of
zero width or height or outside their image are kept, as the reference scores them, with one
warning line per file. Results are checked against it (:mod:`distill.eval.results`); the AP
numbers are read from the precision arrays by :mod:`distill.eval.precision`.

This module is the one entry point: :func:`evaluate_detection` for a results file or list,
:class:`DetectionEvaluator` (reset / process / evaluate) inside a training loop, and
:func:`format_table`.

LVIS: when the ground truth is an LVIS file (its images carry ``neg_category_ids`` and
``not_exhaustive_category_ids``, its categories a ``frequency``), :func:`evaluate_detection` and
:class:`DetectionEvaluator` run LVIS's federated protocol instead (:mod:`distill.eval.lvis`,
300 detections per image) and log which protocol ran; the keys add ``APs``, ``APm``, ``APl``,
``AP_r``, ``AP_c``, ``AP_f`` (novel = the categories whose split is novel: LVIS rare unless the
file or the vocabulary says otherwise).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from distill.errors import DistillError
from distill.eval.coco_stream import IOU_THRS, StreamingBoxEval
from distill.eval.gt import load_box_gt, load_gt
from distill.eval.lvis import MAX_DETS, LvisEval, evaluate_lvis, load_lvis_gt, lvis_metrics, warn_frequency
from distill.eval.match import dataset_results, gt_images_and_categories
from distill.eval.precision import categories_split, empty_precision, image_mask, metrics_from_precision, run_coco, run_stream
from distill.eval.results import box_results, for_iou_type, load_results, top_results
from distill.files import write_json

log = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm")
BACKENDS = ("auto", "stream", "faster", "pycocotools")
SUMMARY_KEYS = ("AP", "AP50", "AP75", "AP_base", "AP_novel", "AP50_base", "AP50_novel")
LVIS_KEYS = ("APs", "APm", "APl", "AP_r", "AP_c", "AP_f")

__all__ = ["evaluate_detection", "DetectionEvaluator", "format_table", "IOU_TYPES"]


def _check_options(iou_types: tuple, backend: str, max_dets: int | None) -> None:
    bad = [t for t in iou_types if t not in IOU_TYPES]
    if bad or not iou_types:
        raise DistillError(f"iou types {list(iou_types)}: expected a non-empty subset of {list(IOU_TYPES)}")
    if backend not in BACKENDS:
        raise DistillError(f"backend {backend!r}: expected one of {list(BACKENDS)}")
    if max_dets is not None and int(max_dets) < 1:
        raise DistillError(f"max_dets {max_dets}: expected a positive integer")


def _backend_for(backend: str, iou_type: str) -> str:
    """``auto`` and ``stream`` evaluate boxes with the streaming evaluator and masks with
    faster-coco-eval (the streaming evaluator has no masks)."""
    if backend in ("auto", "stream"):
        return "stream" if iou_type == "bbox" else "faster"
    return backend


def _lvis_max_dets(max_dets: int | None, name: str) -> int:
    """The LVIS protocol's detections per image (said once, with a warning when another number was asked)."""
    if max_dets is not None and int(max_dets) != MAX_DETS:
        log.warning("%s: LVIS protocol: %d detections per image (max_dets=%s not used)", name, MAX_DETS, max_dets)
    log.info("%s: LVIS federated evaluation (%d detections per image)", name, MAX_DETS)
    return MAX_DETS


def _empty_stream(box_gt, images: np.ndarray, cat_ids: list) -> tuple[np.ndarray, np.ndarray]:
    """No detection on the evaluated ``images`` (bool mask): :func:`empty_precision` of a BoxGT."""
    has = box_gt.has_non_crowd(images)
    return empty_precision(cat_ids, {box_gt.cat_ids[k] for k in np.flatnonzero(has)})


# --------------------------------------------------------------------------------------------
# a results file or list


def evaluate_detection(
    gt_json: str | os.PathLike | dict,
    results: str | os.PathLike | list[dict],
    out_dir: str | os.PathLike | None = None,
    iou_types: Sequence[str] = ("bbox",),
    vocab=None,
    max_dets: int | None = None,
    backend: str = "auto",
    img_ids: Iterable[int] | None = None,
) -> dict[str, float]:
    """COCO AP / AP50 / AP75 over all, base and novel categories.

    Args:
        gt_json: COCO instances file (or its dict); categories carry ``split`` ("base"/"novel").
        results: a COCO results json path, or a list of ``{image_id, category_id, bbox: [x, y, w, h],
            score, segmentation?: RLE}`` (ids are the ground truth's); or a COCO dataset (dict or
            file, e.g. ``distill label``'s labels.json) whose ``images`` carry ``file_name``: its
            images are matched to the ground truth's by file name and its categories by name
            (:func:`distill.eval.match.dataset_results`).
        out_dir: when given, ``metrics.json`` is written there (atomically).
        iou_types: any of ``("bbox", "segm")``.
        vocab: a :class:`~distill.vocab.Vocabulary` naming every GT category (matched by name or
            synonym, not by id: see :func:`~distill.eval.precision.vocab_classes`); it gives their split (and names). A
            GT category it lacks is an error naming both; its classes that are not GT
            categories are not evaluated (a one-line note).
        max_dets: detections kept per image (highest scores) and COCO's largest maxDets; default
            100 (COCO). An LVIS ground truth always keeps 300 (the LVIS protocol).
        backend: ``"auto"`` (boxes: ``"stream"``, masks: ``"faster"``), ``"stream"`` (the
            streaming box evaluator, flat memory; masks still go to faster-coco-eval),
            ``"faster"`` (faster-coco-eval) or ``"pycocotools"`` (the reference).
        img_ids: evaluate only these images (default: every GT image).

    Returns:
        ``{"bbox/AP": ..., "bbox/AP_novel": ..., "bbox/AP50/<name>": ..., ...}`` (LVIS: also
        ``bbox/APs``, ``bbox/APm``, ``bbox/APl``, ``bbox/AP_r``, ``bbox/AP_c``, ``bbox/AP_f``).
    """
    iou_types = tuple(iou_types)
    _check_options(iou_types, backend, max_dets)
    if img_ids is not None:
        img_ids = sorted(set(img_ids))
    lgt = load_lvis_gt(gt_json, iou_types)
    if lgt is not None:
        results = dataset_results(results, lambda: gt_images_and_categories(gt_json), lgt.name)
        metrics, n_dets, res_name = evaluate_lvis(lgt, results, iou_types, vocab, _lvis_max_dets(max_dets, lgt.name), img_ids)
    else:
        max_dets = 100 if max_dets is None else int(max_dets)
        if {_backend_for(backend, t) for t in iou_types} == {"stream"}:
            metrics, n_dets, res_name = _evaluate_stream(gt_json, results, vocab, max_dets, img_ids)
        else:
            metrics, n_dets, res_name = _evaluate_dicts(gt_json, results, iou_types, vocab, max_dets, backend, img_ids)
    if not n_dets:
        log.warning("%s: no predictions; every AP is 0", res_name)
    if out_dir is not None:
        write_json(Path(out_dir) / "metrics.json", metrics)
    return metrics


def _evaluate_stream(gt_json, results, vocab, max_dets: int, img_ids) -> tuple[dict, int, str]:
    """Boxes only, streaming: the GT as flat arrays, the results checked and packed one by one.
    Returns ``(metrics, detections on the evaluated images, results name)``."""
    box_gt, categories, gt_name = load_box_gt(gt_json)
    results = dataset_results(results, lambda: gt_images_and_categories(gt_json), gt_name)
    arrays, res_name = box_results(results, box_gt, gt_name)
    warn_frequency(categories, gt_name)
    cat_ids, names, split = categories_split({"categories": categories}, gt_name, vocab)
    images = image_mask(box_gt, img_ids)
    n_dets = int(images[arrays[0]].sum())
    if n_dets:
        prec, iou_thrs = run_stream(box_gt, arrays, max_dets, img_ids)
    else:
        prec, iou_thrs = _empty_stream(box_gt, images, cat_ids)
    return metrics_from_precision(prec, iou_thrs, names, split, "bbox"), n_dets, res_name


def _evaluate_dicts(gt_json, results, iou_types: tuple, vocab, max_dets: int, backend: str, img_ids) -> tuple[dict, int, str]:
    """The ground truth and results as dicts, each iou type by its backend (as :func:`_evaluate_stream`)."""
    gt, gt_name = load_gt(gt_json, iou_types)
    results = dataset_results(results, lambda: gt_images_and_categories(gt), gt_name)
    dets, res_name = load_results(results, gt, iou_types, gt_name)
    warn_frequency(gt["categories"], gt_name)
    cat_ids, names, split = categories_split(gt, gt_name, vocab)
    if img_ids is not None:
        keep_imgs = set(img_ids)
        dets = [r for r in dets if r["image_id"] in keep_imgs]
    dets = top_results(dets, max_dets)
    metrics: dict[str, float] = {}
    for t in iou_types:
        b = _backend_for(backend, t)
        if not dets:
            ev_imgs = set(img_ids) if img_ids is not None else None
            has_gt = {a["category_id"] for a in gt["annotations"] if not a.get("iscrowd", 0) and (ev_imgs is None or a["image_id"] in ev_imgs)}
            prec, iou_thrs = empty_precision(cat_ids, has_gt)
        elif b == "stream":
            prec, iou_thrs = run_stream(gt, dets, max_dets, img_ids, gt_name)
        else:
            prec, iou_thrs = run_coco(gt, for_iou_type(dets, t), t, max_dets, b, img_ids)
        metrics.update(metrics_from_precision(prec, iou_thrs, names, split, t))
    return metrics, len(dets), res_name


# --------------------------------------------------------------------------------------------
# streaming evaluator (during training)


class DetectionEvaluator:
    """reset / process / evaluate, for use inside a training loop.

    Boxes only (the default backend): each image's detections are matched against its ground
    truth as soon as they are processed, and only a compact record per detection is kept (score,
    category, and its match at each IoU threshold: about 20 bytes), with the ground truth as flat
    arrays, so the memory stays flat as the images grow. With masks, or with ``backend="faster"``
    / ``"pycocotools"``, at most ``max_dets`` COCO results per image are kept (masks as RLE) and
    evaluated at the end. Under ``torch.distributed`` the records (or results) of all ranks are
    gathered; rank 0 gets the metrics, the other ranks an empty dict. An image processed more than
    once (e.g. the padding of a ``DistributedSampler``) counts once with the streaming backend.

    Args:
        gt_json: COCO instances file (or dict) of the images that will be processed.
        vocab: maps label indices to category ids (``vocab.ids[label]``) and gives the split;
            default: the GT file's categories in file order.
        iou_types: ``("bbox",)`` or ``("bbox", "segm")`` (then predictions carry ``masks``).
        backend: as :func:`evaluate_detection`.
        out_dir: where :meth:`evaluate` writes ``metrics.json`` (optional).
    """

    def __init__(
        self,
        gt_json: str | os.PathLike | dict,
        vocab=None,
        iou_types: Sequence[str] = ("bbox",),
        max_dets: int | None = None,
        backend: str = "auto",
        out_dir: str | os.PathLike | None = None,
    ) -> None:
        iou_types = tuple(iou_types)
        _check_options(iou_types, backend, max_dets)
        self._lvis = load_lvis_gt(gt_json, iou_types)
        self.streaming = {_backend_for(backend, t) for t in iou_types} == {"stream"}
        if self._lvis is not None:
            self.streaming = False
            self.gt, self.gt_name = None, self._lvis.name
            categories = self._lvis.categories
            self._valid_imgs = self._lvis.img_index
            self._lvis_evs = {t: LvisEval(self._lvis, t) for t in iou_types}
            max_dets = _lvis_max_dets(max_dets, self.gt_name)
        elif self.streaming:
            # the GT as flat arrays; a file's GT is never held as dicts (``self.gt`` stays None)
            self._box_gt, categories, self.gt_name = load_box_gt(gt_json)
            self.gt = gt_json if isinstance(gt_json, dict) else None
            self._matcher = StreamingBoxEval(self._box_gt)
            self._valid_imgs = self._box_gt.img_index
        else:
            self.gt, self.gt_name = load_gt(gt_json, iou_types)
            categories = self.gt["categories"]
            self._valid_imgs = {im["id"] for im in self.gt["images"]}
        self._categories = list(categories)
        if vocab is None:
            from distill.vocab import vocab_from_categories

            vocab = vocab_from_categories(categories, self.gt_name)
        self.vocab = vocab
        self.label_to_cat = list(vocab.ids)
        self.iou_types = iou_types
        self.max_dets = 100 if max_dets is None else int(max_dets)
        self.backend = backend
        self.out_dir = out_dir
        if self.streaming or self._lvis is not None:
            # label index -> GT category index (-1: the category is not in the ground truth)
            cat_index = self._lvis.cat_index if self._lvis is not None else self._box_gt.cat_index
            self._label_to_k = np.array([cat_index.get(c, -1) for c in self.label_to_cat], dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        self._results: list[dict] = []
        self._img_ids: set[int] = set()
        if self.streaming:
            self._matcher.reset()
        for ev in getattr(self, "_lvis_evs", {}).values():
            ev.reset()

    def process(self, image_ids: Sequence[int], predictions: Sequence[dict]) -> None:
        """Add one batch.

        Args:
            image_ids: COCO image ids of the batch.
            predictions: per image ``{"boxes": (N, 4) float XYXY absolute pixels, "scores": (N,),
                "labels": (N,) int64 vocabulary indices, "masks": optional (N, H, W) or (N, 1, H, W)
                (bool/uint8, or float probabilities thresholded at 0.5)}``.
        """
        import torch

        if len(image_ids) != len(predictions):
            raise ValueError(f"{len(image_ids)} image ids for {len(predictions)} predictions")
        batch_imgs: list[int] = []
        det_img, det_cat, det_box, det_score = [], [], [], []
        for img_id, pred in zip(image_ids, predictions):
            img_id = int(img_id)
            if img_id not in self._valid_imgs:
                raise DistillError(f"{self.gt_name}: image_id {img_id} is not an image of the ground truth")
            if not self.streaming:
                self._img_ids.add(img_id)
            scores = torch.as_tensor(pred["scores"]).detach().float().cpu()
            boxes = torch.as_tensor(pred["boxes"]).detach().float().cpu().reshape(-1, 4)
            labels = torch.as_tensor(pred["labels"]).detach().long().cpu()
            if not torch.isfinite(boxes).all() or not torch.isfinite(scores).all():
                raise ValueError(f"image {img_id}: NaN or infinite boxes/scores in predictions")
            if len(labels) and (labels.min() < 0 or labels.max() >= len(self.label_to_cat)):
                raise ValueError(f"image {img_id}: label outside 0..{len(self.label_to_cat) - 1}")
            order = torch.argsort(scores, descending=True, stable=True)[: self.max_dets]
            xywh = boxes[order].clone()
            xywh[:, 2:] -= xywh[:, :2]
            if self._lvis is not None:
                self._add_lvis(img_id, pred, order, xywh, scores, labels)
            elif self.streaming:
                k = self._valid_imgs[img_id]
                lab = labels[order].numpy()
                cats = self._categories_of(img_id, lab, self._label_to_k[lab])
                batch_imgs.append(k)
                det_img.append(np.full(len(cats), k, np.int64))
                det_cat.append(cats)
                det_box.append(xywh.double().numpy())
                det_score.append(scores[order].double().numpy())
            else:
                self._add_results(img_id, pred, order, xywh, scores, labels)
        if self.streaming and batch_imgs:
            self._matcher.add(batch_imgs, np.concatenate(det_img), np.concatenate(det_cat), np.concatenate(det_box),
                              np.concatenate(det_score))

    def _categories_of(self, img_id: int, labels: np.ndarray, gt_cats: np.ndarray) -> np.ndarray:
        if (gt_cats < 0).any():
            lab = int(labels[gt_cats < 0][0])
            raise DistillError(f"image {img_id}: label {lab} is category_id {self.label_to_cat[lab]!r}, "
                               f"which is not a category of {self.gt_name}")
        return gt_cats

    def _add_lvis(self, img_id: int, pred: dict, order, xywh, scores, labels) -> None:
        """One image into the federated evaluators: only the detections of its evaluated
        categories are kept (their masks encoded), in score order (``pos`` = rank)."""
        from pycocotools import mask as mask_util

        k = self._valid_imgs[img_id]
        lab = labels[order].numpy()
        cats = self._categories_of(img_id, lab, self._label_to_k[lab])
        n = len(cats)
        img = np.full(n, k, np.int64)
        box = xywh.double().numpy()
        score = scores[order].double().numpy()
        area = box[:, 2] * box[:, 3]  # LVISResults: a result with a box has area w * h
        ev0 = next(iter(self._lvis_evs.values()))
        keep = np.flatnonzero(ev0.keep_mask(img, cats))
        for t, ev in self._lvis_evs.items():
            rles = None
            if t == "segm":
                m = _binary_masks(pred, order)
                rles = [None] * n
                for j in keep.tolist():
                    rles[j] = mask_util.encode(np.asfortranarray(m[j].astype(np.uint8)))
            ev.add([k], img[keep], keep, cats[keep], box[keep], score[keep], area[keep],
                   [rles[j] for j in keep] if rles is not None else None)

    def _add_results(self, img_id: int, pred: dict, order, xywh, scores, labels) -> None:
        from pycocotools import mask as mask_util

        masks = _binary_masks(pred, order) if "segm" in self.iou_types else None
        for j, (b, s, lab) in enumerate(zip(xywh.tolist(), scores[order].tolist(), labels[order].tolist())):
            r = {"image_id": img_id, "category_id": int(self.label_to_cat[lab]), "bbox": b, "score": float(s)}
            if masks is not None:
                rle = mask_util.encode(np.asfortranarray(masks[j].astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                r["segmentation"] = rle
            self._results.append(r)

    @staticmethod
    def _gather(obj) -> list | None:
        """``[obj of rank 0, obj of rank 1, ...]`` on rank 0, None on the others; ``[obj]`` when
        not distributed."""
        try:
            import torch.distributed as dist

            distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        except ImportError:  # pragma: no cover
            distributed = False
        if not distributed:
            return [obj]
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered if dist.get_rank() == 0 else None

    def evaluate(self) -> dict[str, float]:
        if self._lvis is not None:
            return self._evaluate_lvis()
        if self.streaming:
            return self._evaluate_stream()
        gathered = self._gather((self._results, sorted(self._img_ids)))
        if gathered is None:
            return {}
        results = [r for part, _ in gathered for r in part]
        img_ids = {i for _, ids in gathered for i in ids}
        if not img_ids:
            raise DistillError("DetectionEvaluator: no images were processed")
        return evaluate_detection(
            self.gt, results, out_dir=self.out_dir, iou_types=self.iou_types, vocab=self.vocab,
            max_dets=self.max_dets, backend=self.backend, img_ids=img_ids,
        )

    def _evaluate_lvis(self) -> dict[str, float]:
        states = self._gather({t: ev.state() for t, ev in self._lvis_evs.items()})
        if states is None:
            return {}
        precs = {}
        for t, ev in self._lvis_evs.items():
            merged = ev if len(states) == 1 else LvisEval.merged(self._lvis, t, [s[t] for s in states])
            if not merged.seen.any():
                raise DistillError("DetectionEvaluator: no images were processed")
            precs[t] = merged.precision()
        return self._written(lvis_metrics(self._lvis, precs, self.vocab))

    def _evaluate_stream(self) -> dict[str, float]:
        states = self._gather(self._matcher.state())
        if states is None:
            return {}
        matcher = self._matcher if len(states) == 1 else StreamingBoxEval.merged(self._box_gt, states)
        if not matcher.seen.any():
            raise DistillError("DetectionEvaluator: no images were processed")
        cat_ids, names, split = categories_split({"categories": self._categories}, self.gt_name, self.vocab)
        if matcher.n_records:
            prec, iou_thrs = matcher.precision(), IOU_THRS.copy()
        else:
            prec, iou_thrs = _empty_stream(self._box_gt, matcher.seen, cat_ids)
            log.warning("%s: no predictions; every AP is 0", "results")
        return self._written(metrics_from_precision(prec, iou_thrs, names, split, "bbox"))

    def _written(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.out_dir is not None:
            write_json(Path(self.out_dir) / "metrics.json", metrics)
        return metrics


def _binary_masks(pred: dict, order) -> np.ndarray:
    """``pred["masks"]`` ((N, H, W) or (N, 1, H, W); bool/uint8, or float probabilities thresholded
    at 0.5) as bool numpy, rows in ``order``."""
    import torch

    m = torch.as_tensor(pred["masks"]).detach().cpu()
    if m.dim() == 4:
        m = m[:, 0]
    m = (m > 0.5) if m.is_floating_point() else m.bool()
    return m[order].numpy()


# --------------------------------------------------------------------------------------------
# table


def _fmt(v: float | None) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and (math.isnan(v) or v < 0):
        return "-"
    return f"{100 * v:.1f}"


def format_table(metrics: dict[str, float]) -> str:
    """A short markdown table (percent, one decimal; ``-`` = undefined) of the summary metrics.

    Detection rows per iou type (AP, AP50, AP75, base/novel; with LVIS's federated metrics also
    APs/m/l and AP_r/c/f); a segmentation row when the
    ``miou/...`` keys are present.
    """
    lines: list[str] = []
    types = [t for t in IOU_TYPES if f"{t}/AP" in metrics]
    if types:
        keys = SUMMARY_KEYS + (LVIS_KEYS if any(f"{t}/AP_r" in metrics for t in types) else ())
        lines.append("| | " + " | ".join(keys) + " |")
        lines.append("|---" * (len(keys) + 1) + "|")
        for t in types:
            lines.append(f"| {t} | " + " | ".join(_fmt(metrics.get(f"{t}/{k}")) for k in keys) + " |")
    seg_keys = ("miou/base", "miou/novel", "miou/all", "miou/hiou", "pixel_acc")
    if any(k in metrics for k in seg_keys):
        if lines:
            lines.append("")
        lines.append("| mIoU base | mIoU novel | mIoU all | hIoU | pixel acc |")
        lines.append("|---|---|---|---|---|")
        lines.append("| " + " | ".join(_fmt(metrics.get(k)) for k in seg_keys) + " |")
    return "\n".join(lines)
