import json

import pytest

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
    from distill.io import sha256_json

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
