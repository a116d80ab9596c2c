"""Tiny real-format datasets (COCO / OV-COCO, LVIS v1, PASCAL VOC 2012, a plain photo folder) made
at test time from the real photographs that installed packages ship: matplotlib's
``sample_data/grace_hopper.jpg`` and scikit-image's bundled ``skimage/data`` images (astronaut,
chelsea, coffee, motorcycle_left, camera, rocket). Nothing is downloaded and nothing is committed:
every builder writes into the folder it is given, deterministically, in well under a second.

Annotations are written by hand (boxes placed by looking at each photo), in the photo's own pixel
coordinates (:data:`PHOTOS`: ``box`` XYWH, ``polygon`` flat ``[x0, y0, x1, y1, ...]``), then scaled
with the photo when it is downscaled (longest side <= 384 px; ``chelsea`` keeps its 451 x 300).

Conventions (the project's loader, :func:`distill.data.images.load_image`, applies EXIF orientation
with ``PIL.ImageOps.exif_transpose``):

- every annotation (boxes, polygons, ``width`` / ``height`` in the jsons, VOC masks) is in the
  UPRIGHT frame, i.e. the image as an EXIF-honouring loader returns it;
- ``chelsea`` is stored sideways: its JPEG pixels are the upright photo rotated 90 degrees
  counter-clockwise (stored size 300 x 451) with EXIF Orientation = 6 ("rotate 90 CW to view"), so
  ``exif_transpose`` gives the upright 451 x 300 cat that the annotations describe; a loader that
  ignores EXIF sees a 300 x 451 image and disagrees with ``width`` / ``height``;
- ``camera`` (the cameraman) is stored as a single-channel (mode ``L``) JPEG; readers must return it
  as 3-channel RGB with equal channels;
- ``rocket`` carries no COCO / VOC class: it is the unlabeled image (COCO ``unlabeled2017``).

Layouts (what the real configs expect; see configs/coco/vild_r50_ovcoco.yaml, configs/lvis/vild_r50.yaml,
configs/voc/clip_es.yaml and configs/voc/lseg_voc.yaml):

- :func:`make_coco`: ``images/{train2017,val2017,unlabeled2017}/<12-digit id>.jpg``,
  ``annotations/instances_{train,val}2017.json`` (all 80 COCO categories with their real ids, names
  and supercategories; the 65 OV-COCO ones also carry ``split`` from configs/vocab/coco_48_17.json),
  ``annotations/instances_val2017_ov65.json`` (val restricted to the 65), ``file_name`` relative to
  ``images/`` (``"train2017/000000000002.jpg"``);
- :func:`make_lvis`: LVIS v1 ``lvis_v1_{train,val}.json`` over the same images (real LVIS ids,
  names, synonyms, synsets, definitions and frequencies; ``coco_url`` and an added ``file_name``;
  ``neg_category_ids`` / ``not_exhaustive_category_ids``; no ``iscrowd``, as in LVIS);
- :func:`make_voc`: ``VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}`` with palette
  PNGs (0 = background, 1..20 = VOC classes, 255 = a 5-pixel band along every object outline) and
  the CLIP-ES image-level labels json ``[{"image_id", "file_name", "category_ids"}]``;
- :func:`make_photo_folder`: a plain folder of mixed .jpg / .png photos for ``distill label``,
  with ``vocab.txt`` (:data:`PHOTO_VOCAB`) and a hidden-ground-truth ``gt.json`` next to it.

``python tests/realdata.py /tmp/realdata`` builds every fixture there and draws one overlay PNG per
fixture (boxes, polygons, VOC masks) to look at.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

MAX_SIDE = 384
JPEG_QUALITY = 90
EXIF_ORIENTATION = 0x0112

# --------------------------------------------------------------------------------------------
# the photos and their hand-written annotations (source-photo pixels, upright)


@dataclass(frozen=True)
class Obj:
    """One annotated object. ``box``: XYWH; ``polygon``: flat xy list inside ``box``.

    ``coco``: COCO category id, ``lvis``: LVIS v1 name, ``voc``: VOC class index 1..20 (None =
    not a class of that dataset); ``word``: the everyday word (photo folder vocabulary)."""

    word: str
    box: tuple[float, float, float, float]
    polygon: tuple[float, ...]
    coco: int | None = None
    lvis: str | None = None
    voc: int | None = None
    crowd: bool = False


@dataclass(frozen=True)
class Photo:
    key: str
    package: str  # "matplotlib" or "skimage"
    file: str
    image_id: int
    objects: tuple[Obj, ...]
    tags: tuple[str, ...]  # image-level labels (everyday words)
    max_side: int = MAX_SIDE
    gray: bool = False
    exif_orientation: int = 1  # 1 = stored upright; 6 = stored rotated 90 CCW (view: rotate 90 CW)


PHOTOS: tuple[Photo, ...] = (
    Photo(
        "grace_hopper", "matplotlib", "grace_hopper.jpg", 1,
        (
            Obj("person", (15, 25, 497, 575), (
                175, 70, 215, 35, 265, 25, 320, 35, 355, 75, 372, 120, 360, 200, 350, 290, 330, 330,
                420, 360, 480, 390, 512, 430, 512, 600, 15, 600, 25, 470, 60, 400, 150, 360, 190, 330,
                175, 290, 160, 220, 155, 130), coco=1, lvis="person", voc=15),
            Obj("tie", (222, 405, 78, 100), (
                222, 412, 260, 405, 300, 412, 280, 440, 275, 500, 262, 505, 248, 500, 240, 440), coco=32, lvis="necktie"),
            Obj("flag", (0, 0, 232, 600), (
                0, 0, 232, 0, 215, 40, 175, 70, 155, 130, 160, 220, 175, 290, 190, 330, 150, 360, 60, 400,
                25, 470, 15, 600, 0, 600), lvis="flag"),
            Obj("hat", (155, 25, 217, 105), (
                175, 70, 215, 35, 265, 25, 320, 35, 355, 75, 372, 120, 330, 112, 260, 100, 195, 108, 155, 130), lvis="hat"),
            Obj("glasses", (165, 170, 193, 62), (
                165, 178, 260, 175, 358, 170, 352, 200, 330, 225, 290, 228, 265, 200, 240, 230, 195, 232, 170, 210), lvis="spectacles"),
        ),
        ("person", "tie", "flag", "hat", "glasses"),
    ),
    Photo(
        "astronaut", "skimage", "astronaut.png", 2,
        (
            Obj("person", (25, 15, 335, 497), (
                200, 20, 255, 15, 295, 45, 300, 130, 300, 170, 340, 230, 360, 300, 345, 345, 290, 380,
                275, 440, 270, 512, 60, 512, 25, 470, 40, 330, 80, 250, 120, 210, 115, 180, 150, 150,
                155, 60), coco=1, lvis="person", voc=15),
            Obj("helmet", (275, 345, 237, 167), (
                280, 420, 320, 370, 380, 345, 440, 345, 490, 370, 512, 400, 512, 512, 290, 512, 275, 470), lvis="helmet"),
            Obj("flag", (0, 0, 98, 512), (
                0, 0, 60, 0, 75, 80, 95, 150, 98, 230, 80, 250, 40, 330, 25, 470, 20, 512, 0, 512), lvis="flag"),
            Obj("space shuttle", (353, 0, 114, 275), (
                400, 0, 437, 0, 440, 40, 453, 45, 458, 150, 465, 215, 467, 260, 440, 275, 380, 272, 353, 250,
                360, 215, 378, 150, 380, 45, 393, 40), lvis="space_shuttle"),
            Obj("jumpsuit", (25, 160, 335, 352), (
                120, 210, 150, 160, 200, 190, 300, 170, 340, 230, 360, 300, 345, 345, 290, 380, 275, 440,
                270, 512, 60, 512, 25, 470, 40, 330, 80, 250), lvis="jumpsuit"),
        ),
        ("person", "helmet", "flag", "space shuttle"),
    ),
    Photo(
        "chelsea", "skimage", "chelsea.png", 3,
        (
            Obj("cat", (0, 0, 400, 300), (
                45, 0, 400, 0, 370, 60, 362, 120, 365, 200, 380, 260, 385, 300, 0, 300, 0, 120, 25, 60),
                coco=17, lvis="cat", voc=8),
        ),
        ("cat",), max_side=512, exif_orientation=6,
    ),
    Photo(
        "coffee", "skimage", "coffee.png", 4,
        (
            Obj("cup", (172, 18, 236, 280), (
                175, 70, 210, 30, 290, 18, 370, 30, 408, 70, 398, 150, 380, 210, 345, 250, 300, 262, 250, 262,
                245, 290, 215, 298, 195, 280, 200, 230, 182, 180, 172, 110), coco=47, lvis="cup"),
            Obj("spoon", (325, 68, 100, 257), (
                415, 68, 425, 75, 405, 150, 385, 220, 400, 250, 405, 300, 380, 325, 340, 325, 325, 290,
                335, 255, 370, 225, 395, 140), coco=50, lvis="spoon"),
            Obj("saucer", (75, 90, 405, 300), (
                75, 230, 95, 150, 140, 105, 175, 95, 410, 90, 460, 140, 480, 220, 460, 300, 400, 360, 300, 390,
                200, 385, 120, 340, 85, 290), lvis="saucer"),
            Obj("table", (0, 0, 600, 400), (0, 45, 120, 0, 600, 0, 600, 400, 0, 400), coco=67, lvis="dining_table", voc=11),
        ),
        ("cup", "spoon", "saucer", "table"),
    ),
    Photo(
        "motorcycle", "skimage", "motorcycle_left.png", 5,
        (
            Obj("motorcycle", (92, 100, 593, 352), (
                95, 205, 150, 175, 160, 160, 330, 185, 380, 165, 470, 170, 500, 100, 530, 100, 580, 125,
                585, 150, 550, 190, 520, 230, 600, 275, 640, 300, 685, 360, 680, 420, 640, 452, 590, 445,
                560, 410, 540, 360, 470, 360, 420, 380, 330, 380, 345, 435, 325, 438, 320, 390, 260, 395,
                200, 395, 150, 370, 125, 320, 128, 270, 105, 240, 92, 220), coco=4, lvis="motorcycle", voc=14),
            Obj("bicycle", (0, 140, 45, 95), (0, 145, 30, 140, 45, 170, 40, 225, 15, 235, 0, 230), coco=2, lvis="bicycle", voc=2),
            Obj("headlight", (505, 120, 60, 70), (510, 130, 540, 120, 565, 135, 560, 180, 535, 190, 505, 170), lvis="headlight"),
            Obj("box", (525, 20, 65, 80), (525, 20, 590, 20, 590, 100, 525, 100), lvis="box"),
            # the shelf of containers and cans: one crowd region (COCO iscrowd=1, uncompressed RLE)
            Obj("bottle", (345, 55, 160, 40), (345, 55, 505, 55, 505, 95, 345, 95), coco=44, crowd=True),
        ),
        ("motorcycle", "bicycle", "box"),
    ),
    Photo(
        "camera", "skimage", "camera.png", 6,
        (
            Obj("person", (0, 68, 330, 444), (
                160, 95, 200, 68, 245, 70, 268, 100, 262, 140, 258, 150, 325, 170, 330, 205, 305, 230, 265, 245,
                235, 240, 195, 260, 170, 330, 150, 420, 150, 512, 0, 512, 0, 200, 50, 160, 110, 125, 155, 110),
                coco=1, lvis="person", voc=15),
            Obj("camera", (258, 140, 67, 48), (258, 145, 290, 140, 322, 145, 325, 185, 290, 188, 260, 180), lvis="camera"),
            Obj("tripod", (230, 190, 175, 320), (
                285, 190, 300, 190, 302, 310, 350, 420, 405, 505, 395, 510, 330, 420, 300, 350, 295, 500, 282, 500,
                280, 350, 245, 490, 230, 495, 275, 330), lvis="tripod"),
            Obj("coat", (0, 110, 265, 402), (
                155, 110, 185, 150, 200, 210, 240, 220, 265, 245, 235, 240, 195, 260, 170, 330, 150, 420, 150, 512,
                0, 512, 0, 200, 50, 160, 110, 125), lvis="trench_coat"),
        ),
        ("person", "camera", "tripod", "coat"),
        max_side=320, gray=True,
    ),
    Photo("rocket", "skimage", "rocket.jpg", 7, (), ("rocket",)),
)
BY_KEY = {p.key: p for p in PHOTOS}

# COCO 2017: the 80 thing categories (id, name, supercategory).
_COCO_SUPER = (
    ("person", (1,)), ("vehicle", range(2, 10)), ("outdoor", range(10, 16)), ("animal", range(16, 26)),
    ("accessory", range(27, 34)), ("sports", range(34, 44)), ("kitchen", range(44, 52)), ("food", range(52, 62)),
    ("furniture", range(62, 71)), ("electronic", range(72, 78)), ("appliance", range(78, 83)), ("indoor", range(84, 91)),
)
COCO_NAMES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck", 9: "boat",
    10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench", 16: "bird", 17: "cat",
    18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe",
    27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee", 35: "skis",
    36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove", 41: "skateboard",
    42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass", 47: "cup", 48: "fork", 49: "knife",
    50: "spoon", 51: "bowl", 52: "banana", 53: "apple", 54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot",
    58: "hot dog", 59: "pizza", 60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed",
    67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard",
    77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book",
    85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}
REPO = Path(__file__).resolve().parents[1]
OV_COCO_VOCAB = REPO / "configs/vocab/coco_48_17.json"

# LVIS v1 categories used here: (id, name, frequency, synset, synonyms, def), as in lvis_v1_*.json.
LVIS_CATEGORIES = (
    (94, "bicycle", "f", "bicycle.n.01", ["bicycle", "bike_(bicycle)"], "a wheeled vehicle that has two wheels and is moved by foot pedals"),
    (143, "box", "f", "box.n.01", ["box"], "a (usually rectangular) container; may have a lid"),
    (189, "camera", "f", "camera.n.01", ["camera"], "equipment for taking photographs"),
    (225, "cat", "f", "cat.n.01", ["cat"], "a domestic house cat"),
    (344, "cup", "f", "cup.n.01", ["cup"], "a small open container usually used for drinking; usually has a handle"),
    (367, "dining_table", "f", "dining_table.n.01", ["dining_table"], "a table at which meals are served"),
    (378, "dog", "f", "dog.n.01", ["dog"], "a common domesticated dog"),
    (451, "flag", "f", "flag.n.01", ["flag"], "emblem usually consisting of a rectangular piece of cloth of distinctive design (do not include pole)"),
    (544, "hat", "f", "hat.n.01", ["hat"], "headwear that protects the head from bad weather, sun, or worn for fashion"),
    (549, "headlight", "f", "headlight.n.01", ["headlight", "headlamp"], "a powerful light with reflector; attached to the front of an automobile or locomotive"),
    (556, "helmet", "f", "helmet.n.02", ["helmet"], "a protective headgear made of hard material to resist blows"),
    (600, "jumpsuit", "c", "jump_suit.n.01", ["jumpsuit"], "one-piece garment fashioned after a parachutist's uniform"),
    (703, "motorcycle", "f", "motorcycle.n.01", ["motorcycle"], "a motor vehicle with two wheels and a strong frame"),
    (708, "mug", "f", "mug.n.04", ["mug"], "with handle and usually cylindrical"),
    (716, "necktie", "f", "necktie.n.01", ["necktie", "tie_(necktie)"], "neckwear consisting of a long narrow piece of material worn under a collar and tied in knot at the front"),
    (793, "person", "f", "person.n.01", ["person", "baby", "child", "boy", "girl", "man", "woman", "human"], "a human being"),
    (805, "pin_(non_jewelry)", "r", "pin.n.09", ["pin_(non_jewelry)"], "a small slender (often pointed) piece of wood or metal used to support or fasten or attach things"),
    (915, "saucer", "f", "saucer.n.02", ["saucer"], "a small shallow dish for holding a cup at the table"),
    (991, "space_shuttle", "r", "space_shuttle.n.01", ["space_shuttle"], "a reusable spacecraft with wings for a controlled descent through the Earth's atmosphere"),
    (995, "spectacles", "f", "spectacles.n.01", ["spectacles", "specs", "eyeglasses", "glasses"], "optical instrument consisting of a frame that holds a pair of lenses for correcting defective vision"),
    (1000, "spoon", "f", "spoon.n.01", ["spoon"], "a piece of cutlery with a shallow bowl-shaped container and a handle"),
    (1118, "trench_coat", "r", "trench_coat.n.01", ["trench_coat"], "a military style raincoat; belted with deep pockets"),
    (1121, "tripod", "f", "tripod.n.01", ["tripod"], "a three-legged rack used for support"),
)
LVIS_ID = {c[1]: c[0] for c in LVIS_CATEGORIES}
# LVIS image-level fields: categories verified absent / not exhaustively annotated, per photo.
LVIS_NEG = {"grace_hopper": ["dog", "cat"], "astronaut": ["pin_(non_jewelry)", "dog"], "chelsea": ["dog", "person"],
            "coffee": ["mug", "person"], "motorcycle": ["person", "dog"], "camera": ["dog", "flag"]}
LVIS_NOT_EXHAUSTIVE = {"motorcycle": ["box"]}

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
VOC_BAND = 5  # width of the 255 band along object outlines (pixels)

# Which photos go where. COCO: rocket has no COCO class -> unlabeled2017.
COCO_SPLITS = {"train2017": ("astronaut", "chelsea", "motorcycle", "camera"), "val2017": ("grace_hopper", "coffee")}
COCO_UNLABELED = ("rocket",)
# LVIS v1 train images come from COCO train2017, val images from both; the rare categories
# (space_shuttle, trench_coat) only occur in val.
LVIS_SPLITS = {"train": ("chelsea", "motorcycle"), "val": ("astronaut", "camera", "grace_hopper", "coffee")}
VOC_SPLITS = {"train": ("astronaut", "chelsea", "motorcycle", "coffee"), "val": ("grace_hopper", "camera")}
VOC_NAMES = {p.key: f"2012_{p.image_id:06d}" for p in PHOTOS}
# Photo folder: file name per photo (mixed formats; subfolder to exercise recursive listing).
PHOTO_FILES = {
    "grace_hopper": "grace_hopper.jpg", "astronaut": "astronaut.png", "chelsea": "phone/chelsea_exif6.jpg",
    "coffee": "coffee.png", "motorcycle": "motorcycle.jpg", "camera": "cameraman_gray.jpg", "rocket": "rocket.jpg",
}
PHOTO_VOCAB = (
    "person", "tie", "flag", "hat", "glasses", "helmet", "space shuttle", "jumpsuit", "cat", "cup", "spoon",
    "saucer", "table", "motorcycle", "bicycle", "headlight", "box", "camera", "tripod", "coat", "rocket",
)


# --------------------------------------------------------------------------------------------
# pixels


def _source_path(photo: Photo) -> Path:
    if photo.package == "matplotlib":
        import matplotlib

        return Path(matplotlib.get_data_path()) / "sample_data" / photo.file
    import skimage  # test dependency (pyproject [dev]); only its bundled files are read

    return Path(skimage.__file__).parent / "data" / photo.file


@functools.lru_cache(maxsize=None)
def source_size(key: str) -> tuple[int, int]:
    """(width, height) of the original photo."""
    with Image.open(_source_path(BY_KEY[key])) as im:
        return im.size


@functools.lru_cache(maxsize=None)
def _upright(key: str) -> Image.Image:
    photo = BY_KEY[key]
    with Image.open(_source_path(photo)) as im:
        im = im.convert("L" if photo.gray else "RGB")
    w, h = im.size
    s = min(1.0, photo.max_side / max(w, h))
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return im if size == (w, h) else im.resize(size, Image.LANCZOS)


def photo_image(key: str) -> Image.Image:
    """The upright, downscaled photo (mode RGB, or L for the grayscale one) as annotated."""
    return _upright(key).copy()


def photo_size(key: str) -> tuple[int, int]:
    """(width, height) of the upright, downscaled photo: the frame of every annotation."""
    return _upright(key).size


def _scale(key: str) -> tuple[float, float]:
    (w0, h0), (w, h) = source_size(key), photo_size(key)
    return w / w0, h / h0


def scaled_objects(key: str) -> list[dict]:
    """The photo's objects in the upright, downscaled frame: ``{"word", "box" XYWH, "polygon",
    "coco", "lvis", "voc", "crowd"}`` (coordinates rounded to 0.01 px)."""
    sx, sy = _scale(key)
    out = []
    for o in BY_KEY[key].objects:
        x, y, w, h = o.box
        box = [round(x * sx, 2), round(y * sy, 2), round(w * sx, 2), round(h * sy, 2)]
        poly = [round(v * (sx if i % 2 == 0 else sy), 2) for i, v in enumerate(o.polygon)]
        out.append({"word": o.word, "box": box, "polygon": poly, "coco": o.coco, "lvis": o.lvis, "voc": o.voc, "crowd": o.crowd})
    return out


def polygon_area(poly: list[float]) -> float:
    """Shoelace area of a flat xy polygon."""
    x, y = np.asarray(poly[0::2], np.float64), np.asarray(poly[1::2], np.float64)
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


def _rasterize(poly: list[float], size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool mask of a polygon (PIL fill, the outline included)."""
    m = Image.new("L", size, 0)
    ImageDraw.Draw(m).polygon([(poly[i], poly[i + 1]) for i in range(0, len(poly), 2)], fill=1, outline=1)
    return np.asarray(m, bool)


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE (column-major run lengths, starting with a run of zeros)."""
    flat = np.asarray(mask, np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def save_photo(key: str, path: str | os.PathLike) -> Path:
    """Write the photo to ``path`` (.jpg / .png): upright, or for an EXIF photo the rotated pixels
    plus the orientation tag (JPEG only; a PNG is written upright without EXIF)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    photo, im = BY_KEY[key], _upright(key)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        if photo.exif_orientation == 6:
            exif = Image.Exif()
            exif[EXIF_ORIENTATION] = 6
            im.transpose(Image.Transpose.ROTATE_90).save(path, quality=JPEG_QUALITY, exif=exif.tobytes())
        elif photo.exif_orientation == 1:
            im.save(path, quality=JPEG_QUALITY)
        else:
            raise ValueError(f"{key}: orientation {photo.exif_orientation} not written by this fixture")
    else:
        im.save(path)
    return path


def _write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=False), encoding="utf-8")
    return path


def _image_entry(key: str, file_name: str) -> dict:
    w, h = photo_size(key)
    return {"id": BY_KEY[key].image_id, "file_name": file_name, "width": w, "height": h, "license": 1,
            "coco_url": f"http://images.cocodataset.org/{file_name}", "flickr_url": "",
            "date_captured": "2013-11-14 16:28:13"}


def coco_file_name(key: str, folder: str) -> str:
    return f"{folder}/{BY_KEY[key].image_id:012d}.jpg"


# --------------------------------------------------------------------------------------------
# COCO / OV-COCO


def coco_categories() -> list[dict]:
    """The 80 COCO categories (id, name, supercategory) with ``split`` on the 65 OV-COCO ones."""
    split = {c["id"]: c["split"] for c in json.loads(OV_COCO_VOCAB.read_text(encoding="utf-8"))}
    sup = {i: s for s, ids in _COCO_SUPER for i in ids}
    cats = []
    for cid, name in sorted(COCO_NAMES.items()):
        c = {"id": cid, "name": name, "supercategory": sup[cid]}
        if cid in split:
            c["split"] = split[cid]
        cats.append(c)
    return cats


def _coco_json(keys: tuple[str, ...], folder: str, categories: list[dict], first_ann_id: int) -> dict:
    keep = {c["id"] for c in categories}
    images, anns = [], []
    ann_id = first_ann_id
    for key in keys:
        images.append(_image_entry(key, coco_file_name(key, folder)))
        w, h = photo_size(key)
        for o in scaled_objects(key):
            if o["coco"] is None or o["coco"] not in keep:
                continue
            if o["crowd"]:
                m = _rasterize(o["polygon"], (w, h))
                seg, area = _uncompressed_rle(m), float(m.sum())
            else:
                seg, area = [o["polygon"]], round(polygon_area(o["polygon"]), 2)
            anns.append({"id": ann_id, "image_id": BY_KEY[key].image_id, "category_id": o["coco"], "segmentation": seg,
                         "area": area, "bbox": o["box"], "iscrowd": int(o["crowd"])})
            ann_id += 1
    return {
        "info": {"description": "distill real-photo COCO fixture (tests/realdata.py)", "version": "1.0", "year": 2017},
        "licenses": [{"id": 1, "name": "see matplotlib / scikit-image data licenses", "url": ""}],
        "images": images, "annotations": anns, "categories": categories,
    }


def make_coco(root: str | os.PathLike) -> dict[str, Path]:
    """OV-COCO layout under ``root``; returns ``image_root``, ``train_json``, ``val_json``,
    ``val_ov65_json``, ``unlabeled`` (folder) and ``vocab`` (configs/vocab/coco_48_17.json)."""
    root = Path(root)
    images = root / "images"
    for folder, keys in COCO_SPLITS.items():
        for key in keys:
            save_photo(key, images / coco_file_name(key, folder))
    for key in COCO_UNLABELED:
        save_photo(key, images / coco_file_name(key, "unlabeled2017"))
    cats = coco_categories()
    ov65 = [c for c in cats if "split" in c]
    train = _coco_json(COCO_SPLITS["train2017"], "train2017", cats, 1)
    val = _coco_json(COCO_SPLITS["val2017"], "val2017", cats, 1001)
    val65 = _coco_json(COCO_SPLITS["val2017"], "val2017", ov65, 1001)
    ann = root / "annotations"
    return {
        "image_root": images,
        "train_json": _write_json(ann / "instances_train2017.json", train),
        "val_json": _write_json(ann / "instances_val2017.json", val),
        "val_ov65_json": _write_json(ann / "instances_val2017_ov65.json", val65),
        "unlabeled": images / "unlabeled2017",
        "vocab": OV_COCO_VOCAB,
    }


# --------------------------------------------------------------------------------------------
# LVIS v1


def _lvis_json(keys: tuple[str, ...], first_ann_id: int) -> dict:
    images, anns = [], []
    ann_id = first_ann_id
    counts: dict[int, list[int]] = {c[0]: [0, 0] for c in LVIS_CATEGORIES}  # image_count, instance_count
    for key in keys:
        folder = next(f for f, ks in COCO_SPLITS.items() if key in ks)
        e = _image_entry(key, coco_file_name(key, folder))
        e["neg_category_ids"] = sorted(LVIS_ID[n] for n in LVIS_NEG.get(key, []))
        e["not_exhaustive_category_ids"] = sorted(LVIS_ID[n] for n in LVIS_NOT_EXHAUSTIVE.get(key, []))
        images.append(e)
        seen = set()
        for o in scaled_objects(key):
            if o["lvis"] is None:
                continue
            cid = LVIS_ID[o["lvis"]]
            anns.append({"id": ann_id, "image_id": BY_KEY[key].image_id, "category_id": cid,
                         "segmentation": [o["polygon"]], "area": round(polygon_area(o["polygon"]), 2), "bbox": o["box"]})
            ann_id += 1
            counts[cid][1] += 1
            if cid not in seen:
                seen.add(cid)
                counts[cid][0] += 1
    cats = [{"id": cid, "name": name, "frequency": freq, "synset": synset, "synonyms": list(syn), "def": d,
             "image_count": counts[cid][0], "instance_count": counts[cid][1]}
            for cid, name, freq, synset, syn, d in LVIS_CATEGORIES]
    return {"info": {"description": "distill real-photo LVIS v1 fixture (tests/realdata.py)", "version": "1.0", "year": 2020},
            "licenses": [{"id": 1, "name": "see matplotlib / scikit-image data licenses", "url": ""}],
            "images": images, "annotations": anns, "categories": cats}


def make_lvis(root: str | os.PathLike) -> dict[str, Path]:
    """LVIS v1 layout under ``root``: ``images/{train2017,val2017}`` (the COCO images LVIS annotates)
    and ``lvis_v1_{train,val}.json``; returns ``image_root``, ``train_json``, ``val_json``."""
    root = Path(root)
    images = root / "images"
    for keys in LVIS_SPLITS.values():
        for key in keys:
            folder = next(f for f, ks in COCO_SPLITS.items() if key in ks)
            save_photo(key, images / coco_file_name(key, folder))
    return {
        "image_root": images,
        "train_json": _write_json(root / "lvis_v1_train.json", _lvis_json(LVIS_SPLITS["train"], 1)),
        "val_json": _write_json(root / "lvis_v1_val.json", _lvis_json(LVIS_SPLITS["val"], 1001)),
    }


# --------------------------------------------------------------------------------------------
# PASCAL VOC 2012


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (256 RGB triplets, flat), as in the devkit's ``labelcolormap``."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def voc_mask(key: str, band: int = VOC_BAND) -> np.ndarray:
    """(H, W) uint8 VOC label map of a photo: objects painted largest first (0 = background), then
    a ``band``-pixel 255 band wherever the label changes within the band's reach."""
    w, h = photo_size(key)
    objs = sorted((o for o in scaled_objects(key) if o["voc"]), key=lambda o: -polygon_area(o["polygon"]))
    lab = np.zeros((h, w), np.uint8)
    for o in objs:
        lab[_rasterize(o["polygon"], (w, h))] = o["voc"]
    r = band // 2
    pad = np.pad(lab, r, mode="edge")
    edge = np.zeros_like(lab, bool)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            edge |= pad[r + dy:r + dy + h, r + dx:r + dx + w] != lab
    return np.where(edge, np.uint8(255), lab)


def make_voc(root: str | os.PathLike) -> dict[str, Path]:
    """VOC2012 layout under ``root/VOC2012``; returns ``root`` (VOC2012), ``images``
    (JPEGImages), ``masks`` (SegmentationClass), ``train_list`` / ``val_list``
    (ImageSets/Segmentation) and ``train_labels`` / ``val_labels`` (CLIP-ES image-level jsons,
    ``file_name`` relative to JPEGImages, ids 1..20 in VOC order)."""
    voc = Path(root) / "VOC2012"
    images, masks, sets = voc / "JPEGImages", voc / "SegmentationClass", voc / "ImageSets" / "Segmentation"
    masks.mkdir(parents=True, exist_ok=True)
    sets.mkdir(parents=True, exist_ok=True)
    pal = voc_palette()
    out = {"root": voc, "images": images, "masks": masks}
    for split, keys in VOC_SPLITS.items():
        labels = []
        for key in keys:
            stem = VOC_NAMES[key]
            save_photo(key, images / f"{stem}.jpg")
            png = Image.fromarray(voc_mask(key), mode="P")
            png.putpalette(pal)
            png.save(masks / f"{stem}.png")
            ids = sorted({o["voc"] for o in scaled_objects(key) if o["voc"]})
            labels.append({"image_id": int(stem.replace("_", "")), "file_name": f"{stem}.jpg", "category_ids": ids})
        (sets / f"{split}.txt").write_text("".join(f"{VOC_NAMES[k]}\n" for k in keys), encoding="utf-8")
        out[f"{split}_list"] = sets / f"{split}.txt"
        out[f"{split}_labels"] = _write_json(voc / f"image_labels_{split}.json", labels)
    return out


# --------------------------------------------------------------------------------------------
# a plain photo folder


def make_photo_folder(root: str | os.PathLike) -> Path:
    """``root/photos``: every photo (mixed .jpg / .png, a subfolder, the grayscale and the EXIF
    ones); next to it ``root/vocab.txt`` (:data:`PHOTO_VOCAB`, one word a line) and ``root/gt.json``
    (COCO ground truth over those words, ``file_name`` relative to the folder). Returns the folder."""
    root = Path(root)
    folder = root / "photos"
    for key, name in PHOTO_FILES.items():
        save_photo(key, folder / name)
    (root / "vocab.txt").write_text("".join(f"{w}\n" for w in PHOTO_VOCAB), encoding="utf-8")
    cats = [{"id": i + 1, "name": w} for i, w in enumerate(PHOTO_VOCAB)]
    word_id = {w: i + 1 for i, w in enumerate(PHOTO_VOCAB)}
    images, anns = [], []
    for key, name in PHOTO_FILES.items():
        w, h = photo_size(key)
        images.append({"id": BY_KEY[key].image_id, "file_name": name, "width": w, "height": h})
        for o in scaled_objects(key):
            if o["crowd"]:
                continue
            anns.append({"id": len(anns) + 1, "image_id": BY_KEY[key].image_id, "category_id": word_id[o["word"]],
                         "segmentation": [o["polygon"]], "area": round(polygon_area(o["polygon"]), 2),
                         "bbox": o["box"], "iscrowd": 0})
    _write_json(root / "gt.json", {"images": images, "annotations": anns, "categories": cats})
    return folder


# --------------------------------------------------------------------------------------------
# overlays (to look at)


def draw_overlay(json_path: str | os.PathLike, image_root: str | os.PathLike, out: str | os.PathLike, cols: int = 3) -> Path:
    """One PNG tiling every image of a COCO / LVIS json with its boxes (and polygons) drawn,
    images decoded by the project's loader (EXIF applied)."""
    from distill.data.images import load_image

    data = json.loads(Path(json_path).read_text(encoding="utf-8"))
    names = {c["id"]: c["name"] for c in data["categories"]}
    tiles = []
    for im in data["images"]:
        tile = Image.fromarray(load_image(Path(image_root) / im["file_name"]))
        d = ImageDraw.Draw(tile)
        for a in data["annotations"]:
            if a["image_id"] != im["id"]:
                continue
            colour = tuple(int(v) for v in np.random.default_rng(a["category_id"]).integers(64, 256, 3))
            x, y, w, h = a["bbox"]
            d.rectangle([x, y, x + w, y + h], outline=colour, width=2)
            if isinstance(a.get("segmentation"), list):
                for p in a["segmentation"]:
                    d.line([(p[i], p[i + 1]) for i in range(0, len(p), 2)] + [(p[0], p[1])], fill=colour, width=1)
            d.text((x + 3, y + 3), names[a["category_id"]] + (" (crowd)" if a.get("iscrowd") else ""), fill=colour)
        tiles.append(tile)
    return _tile(tiles, out, cols)


def draw_voc_overlay(voc: dict, out: str | os.PathLike, cols: int = 3) -> Path:
    """The VOC images blended with their palette masks (read back with the project's readers)."""
    from distill.data.images import load_image
    from distill.data.semseg import read_mask

    pal = np.asarray(voc_palette(), np.uint8).reshape(256, 3)
    tiles = []
    for png in sorted(Path(voc["masks"]).glob("*.png")):
        img = load_image(Path(voc["images"]) / f"{png.stem}.jpg").astype(np.float32)
        m = read_mask(png)
        colour = pal[m].astype(np.float32)
        alpha = np.where(m == 0, 0.0, 0.55)[..., None]
        tiles.append(Image.fromarray((img * (1 - alpha) + colour * alpha).astype(np.uint8)))
    return _tile(tiles, out, cols)


def _tile(tiles: list[Image.Image], out, cols: int) -> Path:
    cw = max(t.width for t in tiles)
    ch = max(t.height for t in tiles)
    rows = (len(tiles) + cols - 1) // cols
    sheet = Image.new("RGB", (cw * min(cols, len(tiles)), ch * rows), (40, 40, 40))
    for i, t in enumerate(tiles):
        sheet.paste(t.convert("RGB"), ((i % cols) * cw, (i // cols) * ch))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def main(out: str) -> None:
    root = Path(out)
    coco = make_coco(root / "coco")
    lvis = make_lvis(root / "lvis")
    voc = make_voc(root / "voc")
    photos = make_photo_folder(root / "folder")
    for name, j, r in (("coco_train", coco["train_json"], coco["image_root"]), ("coco_val", coco["val_json"], coco["image_root"]),
                       ("lvis_train", lvis["train_json"], lvis["image_root"]), ("lvis_val", lvis["val_json"], lvis["image_root"]),
                       ("folder", photos.parent / "gt.json", photos)):
        print(draw_overlay(j, r, root / f"overlay_{name}.png"))
    print(draw_voc_overlay(voc, root / "overlay_voc.png"))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/realdata")
