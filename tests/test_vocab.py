import json

import numpy as np
import pytest
import torch
from PIL import Image

from distill.errors import DistillError
from distill.vocab import Vocabulary, load_vocab


def test_txt_with_synonyms_and_comments(tmp_path):
    p = tmp_path / "v.txt"
    p.write_text("# shapes\nred star: scarlet star, ruby star\nblue circle\n\ncrimson star=red star\n", encoding="utf-8")
    v = load_vocab(p)
    assert v.names == ("red star", "blue circle")
    assert v.prompts[0] == ("red star", "scarlet star", "ruby star", "crimson star")
    assert v.index("crimson star") == 0 and v.index("Blue Circle") == 1
    assert v.split == ("base", "base") and v.ids == (1, 2)


def test_inline_with_prompt_mapping():
    v = load_vocab("red star, blue circle, crimson star=red star, navy disk=navy circle")
    assert v.names == ("red star", "blue circle", "navy circle")
    assert v.prompts[0] == ("red star", "crimson star")
    assert v.prompts[2] == ("navy circle", "navy disk")


def test_json_list_and_objects(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps(["cat", "dog"]))
    assert load_vocab(p).names == ("cat", "dog")
    p.write_text(json.dumps([{"name": "cat", "split": "novel", "id": 17}, {"name": "dog", "id": 18}]))
    v = load_vocab(p)
    assert v.split == ("novel", "base") and v.ids == (17, 18) and v.novel_indices == [0]


def test_coco_and_lvis_categories(tmp_path):
    coco = {"images": [], "annotations": [], "categories": [{"id": 5, "name": "bus", "split": "novel"}, {"id": 1, "name": "person", "split": "base"}]}
    p = tmp_path / "coco.json"
    p.write_text(json.dumps(coco))
    v = load_vocab(p)
    assert v.names == ("bus", "person") and v.ids == (5, 1) and v.id_to_index() == {5: 0, 1: 1}
    lvis = {"categories": [{"id": 1, "name": "aerosol_can", "frequency": "c", "synonyms": ["aerosol_can", "spray_can"]}, {"id": 2, "name": "rare_thing", "frequency": "r"}]}
    p.write_text(json.dumps(lvis))
    v = load_vocab(p)
    assert v.split == ("base", "novel")
    assert v.names[0] == "aerosol_can" and v.prompts[0] == ("aerosol can", "spray can")


def test_lvis_names_become_prompt_text(tmp_path):
    """LVIS identifiers are embedded as text (ViLD's processed_name); names still identify classes."""
    cats = [
        {"id": 1, "name": "roller_skate", "frequency": "c", "synonyms": ["roller_skate"]},
        {"id": 2, "name": "pin_(non_jewelry)", "frequency": "r", "synonyms": ["pin_(non_jewelry)"]},
        {"id": 3, "name": "bow-tie", "frequency": "f", "synonyms": ["bow-tie", "bowtie"]},
        {"id": 4, "name": "bottle_cap", "frequency": "c", "synonyms": ["bottle_cap", "cap_(bottle)"]},
        {"id": 5, "name": "tux", "frequency": "r", "synonyms": ["tux", "tuxedo"]},
        {"id": 6, "name": "bow_(weapon)", "frequency": "f"},
        {"id": 7, "name": "bow_(decorative_ribbons)", "frequency": "f"},
    ]
    p = tmp_path / "lvis.json"
    p.write_text(json.dumps({"images": [], "annotations": [], "categories": cats}))
    v = load_vocab(p)
    assert v.names == tuple(c["name"] for c in cats)
    assert [pr[0] for pr in v.prompts] == [
        "roller skate", "pin (non jewelry)", "bow-tie", "bottle cap", "tux", "bow (weapon)", "bow (decorative ribbons)",
    ]
    assert v.prompts[3] == ("bottle cap", "cap (bottle)") and v.prompts[4] == ("tux", "tuxedo")
    assert len({pr[0] for pr in v.prompts}) == len(v)  # qualifiers keep the two bows apart
    assert v.index("roller_skate") == 0 and v.index("pin_(non_jewelry)") == 1
    sub = v.subset([1, 0])
    assert sub.names == ("pin_(non_jewelry)", "roller_skate") and sub.prompts[1][0] == "roller skate"
    assert v.with_split(["tux"]).prompt_names == v.prompt_names
    # plain names: prompt names are the names and the hash is the one without them
    plain = load_vocab("red star, blue circle")
    assert plain.prompt_names == plain.names and plain.prompts[0] == ("red star",)
    from distill.files import sha256_json

    assert plain.hash == sha256_json([plain.names, plain.synonyms])[:16]
    assert v.hash != Vocabulary(v.names, v.synonyms, v.split, v.ids).hash  # the prompt text is part of it


def test_split_file(tmp_path):
    v = load_vocab("a, b, c")
    sf = tmp_path / "split.txt"
    sf.write_text("b\n")
    assert load_vocab("a, b, c", split_file=sf).split == ("base", "novel", "base")
    sj = tmp_path / "split.json"
    sj.write_text(json.dumps({"novel": [3]}))
    assert load_vocab("a, b, c", split_file=sj).novel_indices == [2]
    sf.write_text("zebra\n")
    with pytest.raises(DistillError, match="unknown classes"):
        load_vocab("a, b, c", split_file=sf)
    assert v.hash == load_vocab("a, b, c", split_file=sj).hash  # split does not change embeddings


@pytest.mark.parametrize("src, msg", [(" , ,", "empty vocabulary"), ("a, b, A", "duplicate class"), ("=x", "expected 'prompt=class'")])
def test_bad_inline(src, msg):
    with pytest.raises(DistillError, match=msg):
        load_vocab(src)


def test_bad_files(tmp_path):
    with pytest.raises(DistillError, match="not found"):
        load_vocab(tmp_path / "missing.txt")
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(DistillError, match="not valid json"):
        load_vocab(p)
    p.write_text(json.dumps({"foo": 1}))
    with pytest.raises(DistillError, match="expected a list"):
        load_vocab(p)
    e = tmp_path / "empty.txt"
    e.write_text("# nothing\n")
    with pytest.raises(DistillError, match="empty vocabulary"):
        load_vocab(e)


def test_unicode_and_long_names():
    long = "x" * 500
    v = load_vocab(f"café crème, 猫, {long}")
    assert v.names == ("café crème", "猫", long)
    assert len(v.hash) == 16


def test_ovcoco_split_file_if_present():
    import pathlib

    p = pathlib.Path("configs/vocab/coco_48_17.json")
    if not p.exists():
        pytest.skip("configs/vocab/coco_48_17.json not written yet")
    v = load_vocab(p)
    assert len(v.base_indices) == 48 and len(v.novel_indices) == 17
    assert {"airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard", "skateboard", "cup", "knife", "cake", "couch", "keyboard", "sink", "scissors"} == {v.names[i] for i in v.novel_indices}


# ------------------------------------------------------------------ vocabularies read as meant


def test_inline_names_split_on_newlines_as_well_as_commas():
    assert load_vocab("cat\ndog\nbird").names == ("cat", "dog", "bird")
    assert load_vocab("cat\r\ndog, bird\n\n").names == ("cat", "dog", "bird")
    v = load_vocab("red star\ncrimson star=red star\nblue circle.txt")  # a newline is never a file name
    assert v.names == ("red star", "blue circle.txt") and v.prompts[0] == ("red star", "crimson star")


def test_txt_single_comma_line_is_a_list_several_lines_are_one_class_each(tmp_path):
    p = tmp_path / "v.txt"
    p.write_text("# my classes\n\ncat, dog,bird , kitty=cat\n", encoding="utf-8")
    v = load_vocab(p)
    assert v.names == ("cat", "dog", "bird") and v.prompts[0] == ("cat", "kitty")
    # a colon before the first comma: the one line is a class with synonyms, as before
    p.write_text("red star: scarlet star, ruby star\n", encoding="utf-8")
    v = load_vocab(p)
    assert v.names == ("red star",) and v.prompts[0] == ("red star", "scarlet star", "ruby star")
    # several lines: one class a line, a comma is part of the name; synonyms as 'a: b' and 'a=b'
    p.write_text("building, edifice\nsky\nred star: scarlet star, ruby star\ncrimson star=red star\n", encoding="utf-8")
    v = load_vocab(p)
    assert v.names == ("building, edifice", "sky", "red star")
    assert v.prompts[2] == ("red star", "scarlet star", "ruby star", "crimson star")
    p.write_text("cat,\ndog , ,\n", encoding="utf-8")  # a list copied from code: trailing commas dropped
    assert load_vocab(p).names == ("cat", "dog")


def test_bom_is_dropped_from_txt_json_and_split_files(tmp_path):
    p = tmp_path / "v.txt"
    p.write_bytes("\ufeff# written by Notepad\ncat\ndog\n".encode("utf-8"))
    assert load_vocab(p).names == ("cat", "dog")
    p.write_bytes("\ufeffcat,dog\n".encode("utf-8"))
    assert load_vocab(p).names == ("cat", "dog")
    j = tmp_path / "v.json"
    j.write_bytes("\ufeff".encode("utf-8") + json.dumps(["cat", "dog"]).encode("utf-8"))
    assert load_vocab(j).names == ("cat", "dog")
    s = tmp_path / "split.txt"
    s.write_bytes("\ufeffdog\n".encode("utf-8"))
    assert load_vocab("cat, dog", split_file=s).split == ("base", "novel")


def test_whitespace_collapsed_and_unicode_nfc():
    v = load_vocab("  red \t  star ,blue\u00a0circle, cafe\u0301 cre\u0300me")
    assert v.names == ("red star", "blue circle", "caf\u00e9 cr\u00e8me")
    assert v.index("Red   Star") == 0 and v.index("caf\u00e9 cr\u00e8me") == 2
    v = load_vocab("crimson   star = red   star, red star")
    assert v.names == ("red star",) and v.prompts[0] == ("red star", "crimson star")


def test_a_name_twice_is_an_error_written_the_same_way_or_not(tmp_path):
    with pytest.raises(DistillError) as e:  # the same text twice: refused, not merged
        load_vocab("red square, blue circle, red square")
    assert str(e.value) == ("inline vocabulary: duplicate class 'red square' (entry 3) is already entry 1; keep one "
                            "(synonyms go on its line: 'name: synonym, synonym')")
    with pytest.raises(DistillError) as e:
        load_vocab("red star, blue circle, red  star")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("inline vocabulary: duplicate class 'red  star' (entry 3)")
    assert "'red star' (entry 1)" in msg
    p = tmp_path / "v.txt"
    p.write_text("red star\n# a comment\nblue circle\nRed Star\n", encoding="utf-8")
    with pytest.raises(DistillError) as e:
        load_vocab(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and "'Red Star' (line 4)" in msg and "'red star' (line 1)" in msg
    # COCO names stay as spelled but are compared the same way
    c = tmp_path / "coco.json"
    c.write_text(json.dumps({"categories": [{"id": 1, "name": "red star"}, {"id": 2, "name": "red  star"}]}))
    with pytest.raises(DistillError, match=r"duplicate class 'red  star' \(class 1\) is the same as 'red star' \(class 0\)"):
        load_vocab(c)


def test_nothing_left_is_an_empty_vocabulary(tmp_path):
    p = tmp_path / "v.txt"
    p.write_bytes("\ufeff# only comments\n\n   \n\t\n".encode("utf-8"))
    with pytest.raises(DistillError, match=f"{p}: empty vocabulary") as e:
        load_vocab(p)
    assert "\n" not in str(e.value)
    with pytest.raises(DistillError, match="inline vocabulary: empty vocabulary"):
        load_vocab(" ,\n, \r\n")


# -------------------------------------------------- more than 254 classes: PNG only when asked


def _big_vocab_file(tmp_path, n):
    p = tmp_path / f"big{n}.txt"
    p.write_text("".join(f"thing {i}\n" for i in range(n)), encoding="utf-8")
    return p


class _BoxSource:
    """Two boxes per image, of the last class and of class 254 (whose PNG value is 255)."""

    fingerprint = "fake"

    def __init__(self, n):
        self.n = n

    def __call__(self, images):
        return [{"boxes": torch.tensor([[2.0, 2.0, 12.0, 12.0], [16.0, 16.0, 30.0, 30.0]]),
                 "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([self.n - 1, 254])} for _ in images]


def _label_cfg(tmp_path, vocab, fmt):
    from distill.config import load_config

    imgs = tmp_path / "imgs"
    imgs.mkdir(exist_ok=True)
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 100 + i, np.uint8)).save(imgs / f"{i}.png")
    out = tmp_path / f"out_{fmt.strip('[]').replace(', ', '_')}"
    return load_config(None, [f"label.images={imgs}", f"label.out={out}", f"label.vocab={vocab}", "label.source=teacher",
                              "label.score_thresh=0.0", "label.min_area=0", f"label.format={fmt}", "teacher.templates="]), out


def test_lvis_sized_vocabulary_labels_to_coco_and_yolo(tmp_path):
    from distill.labels.pseudo import label

    cfg, out = _label_cfg(tmp_path, _big_vocab_file(tmp_path, 1203), "[coco, yolo]")
    summary = label(cfg, source=_BoxSource(1203))
    assert summary["labels/images"] == 2
    coco = json.loads((out / "labels.json").read_text())
    assert len(coco["categories"]) == 1203 and {a["category_id"] for a in coco["annotations"]} == {1203, 255}
    assert (out / "yolo" / "labels" / "0.txt").read_text().splitlines()[0].startswith("1202 ")
    assert not (out / "semantic").exists()


def test_png_above_254_classes_is_16_bit_and_reads_back(tmp_path):
    from distill.eval.segmentation import evaluate_semseg_dirs, read_label_png
    from distill.labels import formats
    from distill.labels.pseudo import label

    vocab_file = _big_vocab_file(tmp_path, 300)
    cfg, out = _label_cfg(tmp_path, vocab_file, "[coco, png]")
    label(cfg, source=_BoxSource(300))
    with Image.open(out / "semantic" / "0.png") as im:
        assert im.mode == "I;16"
    sem = read_label_png(out / "semantic" / "0.png")
    assert sem[5, 5] == 300 and sem[20, 20] == 255 and sem[0, 0] == 0
    legend = json.loads((out / "semantic" / "legend.json").read_text())
    assert len(legend) == 301 and legend[-1]["value"] == 300
    # read back as ground truth: 255 is a class there (65535 is the ignore value of 16-bit PNGs)
    gt = tmp_path / "gt"
    gt.mkdir()
    for name in ("0.png", "1.png"):
        (gt / name).write_bytes((out / "semantic" / name).read_bytes())
    m = evaluate_semseg_dirs(gt, out / "semantic", vocab=load_vocab(vocab_file))
    assert m["iou/thing 254"] == 1.0 and m["iou/thing 299"] == 1.0 and m["pixel_acc"] == 1.0
    assert formats.ignore_value(formats.semantic_values(load_vocab(vocab_file))) == 65535
    # up to 254 classes: the 8-bit palette PNGs as before
    small = load_vocab(", ".join(f"t{i}" for i in range(254)))
    assert formats.semantic_values(small) == list(range(1, 255)) and formats.ignore_value(formats.semantic_values(small)) == 255


def test_too_many_classes_for_png_is_refused_only_when_png_is_asked(tmp_path):
    from distill.labels.job import make_job

    big = _big_vocab_file(tmp_path, 65535)
    vocab = load_vocab(big)
    cfg, _ = _label_cfg(tmp_path, big, "[coco]")
    make_job(cfg, vocab)  # fine without PNGs
    cfg, out = _label_cfg(tmp_path, big, "[coco, png]")
    with pytest.raises(DistillError, match=r"65535 classes do not fit a 16-bit label PNG \(at most 65534\); label to coco or yolo instead \(--format coco,yolo\)") as e:
        make_job(cfg, vocab)
    assert "\n" not in str(e.value) and not out.exists()


# ------------------------------------------------------------------------------ resolve_vocab


def _coco_file(path, names, novel=()):
    cats = [{"id": i + 1, "name": n, "split": "novel" if n in novel else "base"} for i, n in enumerate(names)]
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": cats}))
    return str(path)


def test_resolve_vocab_one_fallback_order(tmp_path):
    """The stage's value, then data.vocab, then the categories of data.train_full_json, then of
    data.val_json (each file only when it exists); data.split_file applies to every source."""
    from distill.config import DataConfig
    from distill.vocab import resolve_vocab

    full = _coco_file(tmp_path / "full.json", ["red star", "blue circle"], novel=("blue circle",))
    val = _coco_file(tmp_path / "val.json", ["green cross"])
    missing = str(tmp_path / "missing.json")
    data = DataConfig(vocab="cat, dog", train_full_json=full, val_json=val)
    assert resolve_vocab(data, "owl, bat", key="label.vocab").names == ("owl", "bat")
    assert resolve_vocab(data).names == ("cat", "dog")
    v = resolve_vocab(DataConfig(train_full_json=full, val_json=val))
    assert v.names == ("red star", "blue circle") and v.novel_indices == [1]
    assert resolve_vocab(DataConfig(train_full_json=missing, val_json=val)).names == ("green cross",)
    split = tmp_path / "novel.txt"
    split.write_text("red star\n")
    assert resolve_vocab(DataConfig(train_full_json=full, split_file=str(split))).novel_indices == [0]
    assert resolve_vocab(DataConfig(vocab="red star, blue circle", split_file=str(split))).novel_indices == [0]
    # a given value is read as it is: a missing file is an error, never a fall-through
    with pytest.raises(DistillError, match="vocabulary file not found"):
        resolve_vocab(DataConfig(vocab=missing, train_full_json=full))
    with pytest.raises(DistillError, match=r"^cam\.vocab: required") as e:
        resolve_vocab(DataConfig(train_full_json=missing, val_json=""), key="cam.vocab")
    assert "\n" not in str(e.value)
    with pytest.raises(DistillError, match="no base classes"):
        resolve_vocab(DataConfig(vocab="a, b", split_file=str(_novel(tmp_path, "a\nb\n"))), need_base=True)
    assert resolve_vocab(DataConfig(vocab="a, b", split_file=str(_novel(tmp_path, "a\nb\n")))).novel_indices == [0, 1]


def _novel(tmp_path, text):
    p = tmp_path / "all_novel.txt"
    p.write_text(text)
    return p


def test_json_category_prompt_is_one_prompt_in_place_of_the_name(tmp_path):
    """A category's "prompt" (CLIP-ES's renamed VOC classes) stands for the name in the templates,
    whole: its commas are not split into synonyms; the name still identifies the class."""
    cats = [{"id": 15, "name": "person", "prompt": "person  with clothes,people,human"}, {"id": 16, "name": "pottedplant"}]
    p = tmp_path / "v.json"
    p.write_text(json.dumps({"info": {"description": "x"}, "categories": cats}))
    v = load_vocab(p)
    assert v.names == ("person", "pottedplant") and v.ids == (15, 16)
    assert v.prompts == (("person with clothes,people,human",), ("pottedplant",))
    assert v.index("person") == 0 and v.hash != Vocabulary(v.names, v.synonyms, v.split, v.ids).hash
    p.write_text(json.dumps([{"id": 1, "name": "person", "prompt": " "}]))
    with pytest.raises(DistillError, match=r"categories\[0\] \('person'\): 'prompt' must be a non-empty string"):
        load_vocab(p)
