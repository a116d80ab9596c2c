"""The procedural shapes world: the embedded open-vocabulary problem (docs/architecture.md, "The
embedded default: the shapes world").

Categories are colour x shape pairs ("red star"), ids 1..C in vocabulary order (colour-major). The
novel split is ``world.novel`` when given, otherwise drawn from the seed so that every colour and
every shape also occurs in a base category (compositional zero-shot, like OV-COCO's 48/17 split
keeps the novel words' parts seen).

Each image (``image_size`` square, RGB) has a textured background (flat + noise, gradient, stripes
or blotches in muted colours far from every category colour), a few non-category clutter items
(thin lines, gray/brown blobs, elongated ellipses) and ``min_objects..max_objects`` objects of size
``min_size..max_size`` px (log-uniform), random rotation and mild hue / saturation / brightness
jitter. With ``fill: pattern`` (the default) each shape also has its own fill texture (dots,
checks, stripes, ...; darkened pixels in image axes, so flips keep it), a local cue as natural
categories have fur or wheels: a patch inside an object then tells its class, which dense readings
of the teacher (MaskCLIP, CLIPSelf) need; ``fill: flat`` leaves the outline as the only shape cue.
The texture's phase follows the object's position, so both fills give the same layout and
annotations. Objects are drawn in order, later ones over earlier ones; a placement that would leave an
earlier object less than 30 % visible (or under 20 px) is re-drawn, so every annotation is the
VISIBLE part of an object and no unannotated object fragment is left in an image.

Drawing is done at 2x with anti-aliased polygons (cv2.fillPoly) and downsampled with INTER_AREA;
instance masks are the 2x ownership map downsampled by majority (a pixel belongs to the object
covering most of it, ties to the upper object), so masks agree with what is drawn
(distill/data/world_draw.py; the captions: distill/data/world_captions.py).

Everything comes from ``numpy.random.default_rng([seed, split, index])``: the same config gives
byte-identical files, and each image depends only on (seed, split, index), so changing ``num_train``
leaves the val images unchanged.

Layout under ``{work_dir}/data/`` (docs/contracts.md, "World"): ``images/{split}/{id:06d}.png``,
``instances_{train,val,unlabeled,train_base}.json``, ``semantic/{split}/{id:06d}.png`` (also
``train_base``), ``image_labels_{split}.json``, ``captions.json``, ``vocab.json``, ``world.yaml``,
``manifest.json``. The folder is built under a temporary name and renamed into place, so a killed
build never leaves a ``data/`` that looks complete.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_utils

from distill.config import Config, WorldConfig, config_hash, save_config
from distill.data.world_captions import background_phrase, captions
from distill.data.world_draw import COLORS, FILLS, SHAPES, render
from distill.errors import DistillError
from distill.files import write_json
from distill.vocab import Vocabulary

SPLITS = ("train", "val", "unlabeled")
_SPLIT_INDEX = {"train": 1, "val": 2, "unlabeled": 3}
_NOVEL_STREAM = 1000  # rng stream for the novel split (distinct from the split streams)


# --------------------------------------------------------------------------------------------
# Vocabulary and split
# --------------------------------------------------------------------------------------------


def _check_world(wcfg: WorldConfig) -> None:
    for c in wcfg.colors:
        if c not in COLORS:
            raise DistillError(f"world.colors: unknown colour {c!r} (valid: {', '.join(COLORS)})")
    for s in wcfg.shapes:
        if s not in SHAPES:
            raise DistillError(f"world.shapes: unknown shape {s!r} (valid: {', '.join(SHAPES)})")
    for what, seq in (("world.colors", wcfg.colors), ("world.shapes", wcfg.shapes)):
        if not seq:
            raise DistillError(f"{what}: expected at least one entry")
        if len(set(seq)) != len(seq):
            raise DistillError(f"{what}: duplicate entries in {list(seq)}")
    if wcfg.image_size < 32:
        raise DistillError(f"world.image_size: expected at least 32, got {wcfg.image_size}")
    if not 1 <= wcfg.min_objects <= wcfg.max_objects:
        raise DistillError(f"world.min_objects/max_objects: expected 1 <= min <= max, got {wcfg.min_objects}, {wcfg.max_objects}")
    if not 4 <= wcfg.min_size <= wcfg.max_size <= wcfg.image_size:
        raise DistillError(f"world.min_size/max_size: expected 4 <= min <= max <= image_size, got {wcfg.min_size}, {wcfg.max_size}")
    for key in ("num_train", "num_val", "num_unlabeled", "clutter", "num_novel"):
        if getattr(wcfg, key) < 0:
            raise DistillError(f"world.{key}: expected >= 0, got {getattr(wcfg, key)}")
    if wcfg.fill not in FILLS:
        raise DistillError(f"world.fill: expected one of {', '.join(FILLS)}, got {wcfg.fill!r}")
    if wcfg.num_captions_per_image < 1:
        raise DistillError(f"world.num_captions_per_image: expected >= 1, got {wcfg.num_captions_per_image}")


def _category_names(wcfg: WorldConfig) -> list[str]:
    return [f"{c} {s}" for c in wcfg.colors for s in wcfg.shapes]


def _covers(names: list[str], base: set[str], wcfg: WorldConfig) -> bool:
    colors = {n.split(" ", 1)[0] for n in base}
    shapes = {n.split(" ", 1)[1] for n in base}
    return colors >= set(wcfg.colors) and shapes >= set(wcfg.shapes)


def novel_names(wcfg: WorldConfig) -> list[str]:
    """The novel category names, in vocabulary order."""
    _check_world(wcfg)
    names = _category_names(wcfg)
    if wcfg.novel:
        lower = {n.lower(): n for n in names}
        picked = []
        for n in wcfg.novel:
            key = " ".join(str(n).split()).lower()
            if key not in lower:
                raise DistillError(f"world.novel: unknown category {n!r} (valid: {', '.join(names)})")
            picked.append(lower[key])
        novel = set(picked)
        if len(novel) == len(names):
            raise DistillError("world.novel: every category is novel; expected at least one base category")
        if not _covers(names, set(names) - novel, wcfg):
            warnings.warn("world.novel: some colour or shape occurs in no base category (the split is not compositional)", stacklevel=2)
        return [n for n in names if n in novel]
    if wcfg.num_novel == 0:
        return []
    # Every colour and every shape must stay in base: at most C - max(#colours, #shapes) novel.
    most = len(names) - max(len(wcfg.colors), len(wcfg.shapes))
    if wcfg.num_novel > most:
        raise DistillError(
            f"world.num_novel: {wcfg.num_novel} is too many for {len(wcfg.colors)} colours x {len(wcfg.shapes)} shapes "
            f"(expected at most {most}, so every colour and shape also occurs in a base category)"
        )
    rng = np.random.default_rng([wcfg.seed, _NOVEL_STREAM])
    for _ in range(10000):
        perm = rng.permutation(len(names))
        novel = {names[i] for i in perm[: wcfg.num_novel]}
        if _covers(names, set(names) - novel, wcfg):
            return [n for n in names if n in novel]
    raise DistillError(f"world.num_novel: found no split of {wcfg.num_novel} novel classes keeping every colour and shape in base")


def world_vocab(wcfg: WorldConfig) -> Vocabulary:
    """The world's vocabulary: colour x shape names, ids 1..C, base/novel split."""
    names = _category_names(wcfg)
    novel = set(novel_names(wcfg))
    return Vocabulary(
        names=tuple(names),
        split=tuple("novel" if n in novel else "base" for n in names),
        ids=tuple(range(1, len(names) + 1)),
        source="shapes world",
    )


# --------------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------------


def _png(img: np.ndarray) -> bytes:
    """PNG bytes of an RGB (H, W, 3) or single-channel (H, W) uint8 array (deterministic)."""
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:  # pragma: no cover - cv2 encodes any uint8 array
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def _write(path: Path, data: bytes) -> None:
    # Inside the staging folder: plain writes; the folder is renamed into place at the end.
    with open(path, "wb") as f:
        f.write(data)


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _coco(images: list[dict], anns: list[dict], vocab: Vocabulary, info: dict) -> dict:
    return {"info": info, "licenses": [], "images": images, "annotations": anns, "categories": vocab.categories()}


def world_hash(wcfg: WorldConfig) -> str:
    """Identifies the world's content (the world section, not where it is written)."""
    return config_hash(wcfg)


def make_world(cfg: Config) -> Path:
    """Build the shapes world of ``cfg.world`` into ``{cfg.work_dir}/data`` and return that folder.

    An existing ``data`` folder is replaced (the new one is built under a temporary name first).
    """
    t0 = time.perf_counter()
    vocab = world_vocab(cfg.world)
    out = Path(cfg.work_dir) / "data"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DistillError(f"{out.parent}: cannot create the work dir ({e.strerror})") from None
    stage = out.parent / f".data.tmp-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        counts, dropped = _write_world(cfg, vocab, stage)
        write_json(stage / "manifest.json", _manifest(cfg, vocab, counts, dropped, time.perf_counter() - t0))
        # Swap the finished folder into place.
        trash = None
        if out.exists():
            trash = out.parent / f".data.old-{os.getpid()}"
            os.replace(out, trash)
        os.replace(stage, out)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        raise DistillError(f"{out}: cannot write the world ({e.strerror or e}: {e.filename or ''})") from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out


def _write_world(cfg: Config, vocab: Vocabulary, stage: Path) -> tuple[dict[str, dict], int]:
    """Every file of the world but the manifest, into ``stage``; returns the per-split counts and
    the number of objects dropped as occluded."""
    wcfg = cfg.world
    whash = world_hash(wcfg)
    for sub in [f"images/{s}" for s in SPLITS] + [f"semantic/{s}" for s in (*SPLITS, "train_base")]:
        (stage / sub).mkdir(parents=True, exist_ok=True)
    writer = _ImageWriter(stage, wcfg, vocab)
    sizes = {"train": wcfg.num_train, "val": wcfg.num_val, "unlabeled": wcfg.num_unlabeled}
    counts: dict[str, dict] = {}
    coco_by_split: dict[str, dict] = {}
    for split in SPLITS:
        rec = writer.split(split, sizes[split])
        info = {"description": "distill shapes world", "version": "1", "split": split, "world_hash": whash, "seed": wcfg.seed}
        coco_by_split[split] = _coco(rec["images"], rec["anns"], vocab, info)
        write_json(stage / f"image_labels_{split}.json", rec["labels"], indent=None)
        counts[split] = {"images": len(rec["images"]), "annotations": len(rec["anns"])}
        if split == "train":
            info_b = dict(info, split="train_base", note="OV-COCO protocol: all images, novel annotations removed")
            coco_by_split["train_base"] = _coco(rec["images"], rec["base_anns"], vocab, info_b)
            write_json(stage / "image_labels_train_base.json", rec["base_labels"], indent=None)
            counts["train_base"] = {"images": len(rec["images"]), "annotations": len(rec["base_anns"])}
    for split, coco in coco_by_split.items():
        write_json(stage / f"instances_{split}.json", coco, indent=None)
    write_json(stage / "captions.json", writer.captions, indent=None)
    write_json(stage / "vocab.json", vocab.to_json())
    save_config(cfg, stage / "world.yaml")
    return counts, writer.dropped


class _ImageWriter:
    """Draws and writes each image of a split (image PNG, semantic PNG, the base-only semantic PNG
    of train images) and collects its records; image and annotation ids run over all splits."""

    def __init__(self, stage: Path, wcfg: WorldConfig, vocab: Vocabulary):
        self.stage, self.wcfg, self.vocab = stage, wcfg, vocab
        self.names = list(vocab.names)
        self.novel_ids = {cid for cid, sp in zip(vocab.ids, vocab.split) if sp == "novel"}
        self.image_id = 0
        self.ann_id = 0
        self.captions: list[dict] = []
        self.dropped = 0

    def split(self, split: str, n: int) -> dict[str, list]:
        """The ``n`` images of ``split``: their image, annotation and label records (all, and base only)."""
        rec: dict[str, list] = {"images": [], "anns": [], "labels": [], "base_anns": [], "base_labels": []}
        for index in range(n):
            self._image(split, index, rec)
        return rec

    def _image(self, split: str, index: int, rec: dict[str, list]) -> None:
        self.image_id += 1
        image_id, size = self.image_id, self.wcfg.image_size
        rng = np.random.default_rng([self.wcfg.seed, _SPLIT_INDEX[split], index])
        img, objs, bg_word, clutter = render(rng, self.wcfg, self.names)
        file_name = f"{split}/{image_id:06d}.png"
        _write(self.stage / "images" / file_name, _png(img))
        rec["images"].append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        sem, cats, kept = self._annotate(image_id, objs, rec)
        _write(self.stage / "semantic" / file_name, _png(sem))
        rec["labels"].append({"image_id": image_id, "file_name": file_name, "category_ids": cats})
        if split == "train":
            sem_base = sem.copy()
            for cid in self.novel_ids:
                sem_base[sem == cid] = 255
            _write(self.stage / "semantic" / "train_base" / f"{image_id:06d}.png", _png(sem_base))
            rec["base_labels"].append({"image_id": image_id, "file_name": file_name, "category_ids": [c for c in cats if c not in self.novel_ids]})
        self.captions.append(
            {
                "image_id": image_id,
                "file_name": file_name,
                "split": split,
                "captions": captions(rng, self.names, kept, bg_word, self.wcfg.num_captions_per_image) if kept else [background_phrase(bg_word)],
                # what the captions leave out, for the teacher's stuff crops
                # (pretrain.stuff_fraction): the background texture and the clutter items
                "background": bg_word,
                "clutter": clutter,
            }
        )

    def _annotate(self, image_id: int, objs: list[dict], rec: dict[str, list]) -> tuple[np.ndarray, list[int], list[dict]]:
        """The semantic mask (dropped objects: 255), the sorted category ids and the kept objects
        of one image; appends its COCO annotations (all, and base only) to ``rec``."""
        size = self.wcfg.image_size
        sem = np.zeros((size, size), np.uint8)
        cats: list[int] = []
        kept = []
        for o in objs:
            cid = self.vocab.ids[o["class"]]
            if o["dropped"]:
                sem[o["mask"]] = 255
                self.dropped += 1
                continue
            sem[o["mask"]] = cid
            kept.append(o)
            self.ann_id += 1
            rle = _rle(o["mask"])
            x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
            ann = {
                "id": self.ann_id,
                "image_id": image_id,
                "category_id": cid,
                "segmentation": rle,
                "area": float(o["mask"].sum()),
                "bbox": [x, y, w, h],
                "iscrowd": 0,
            }
            rec["anns"].append(ann)
            if cid not in self.novel_ids:
                rec["base_anns"].append(ann)
            if cid not in cats:
                cats.append(cid)
        cats.sort()
        return sem, cats, kept


def _manifest(cfg: Config, vocab: Vocabulary, counts: dict[str, dict], dropped: int, wall: float) -> dict:
    return {
        "stage": "world",
        "config_hash": config_hash(cfg),
        "world_hash": world_hash(cfg.world),
        "base": [n for n, s in zip(vocab.names, vocab.split) if s == "base"],
        "novel": [n for n, s in zip(vocab.names, vocab.split) if s == "novel"],
        "counts": counts,
        "dropped_occluded": dropped,
        "versions": {
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "opencv": cv2.__version__,
            "pycocotools": _version("pycocotools"),
        },
        "wall_time_s": round(wall, 3),
    }


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


def summary(data_dir: str | Path) -> dict:
    """The manifest of a built world (counts, base/novel names, wall time)."""
    from distill.files import read_json

    return read_json(Path(data_dir) / "manifest.json", "world manifest")
