"""More new-user mistakes from the CLI sweep, met through the installed ``distill`` command from a
folder outside the repository: each is ONE ``error: ...`` line, exit code 2, nothing written."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from test_user_mistakes_cli import TEACHER_CFG, _files, _run


def _setup(tmp):
    (tmp / "imgs").mkdir()
    Image.new("RGB", (32, 32)).save(tmp / "imgs" / "a.png")
    Image.new("RGB", (8, 8)).save(tmp / "image.pt", format="PNG")  # a PNG renamed .pt
    (tmp / "preds").mkdir()
    (tmp / "gt.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "cat"}]}))


CASES = {
    "PNG renamed .pt as --model": (["label", "--images", "imgs", "--out", "out", "--vocab", "cat", "--model", "image.pt"],
                                   ["image.pt: ", "not a PyTorch checkpoint: a PNG image"]),
    "PNG renamed .pt as teacher.pretrained": (["teacher", "embed-text", TEACHER_CFG, "teacher.device=cpu", "--out", "emb", "--vocab", "cat",
                                               "teacher.pretrained=image.pt"], ["image.pt: ", "not a PyTorch checkpoint: a PNG image"]),
    "eval det --pred a folder": (["eval", "det", "--gt", "gt.json", "--pred", "preds"], ["preds: is a folder (expected a COCO results json)"]),
    "eval det --gt a folder": (["eval", "det", "--gt", "preds", "--pred", "gt.json"], ["preds: is a folder (expected a COCO ground-truth json)"]),
    "eval seg --gt-json with --vocab": (["eval", "seg", "--gt", "imgs", "--pred", "preds", "--gt-json", "gt.json", "--vocab", "cat"],
                                        ["eval seg: give --gt-json or --vocab, not both"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sweep_mistake_is_one_line_exit_2_nothing_written(tmp_path, case):
    args, expected = CASES[case]
    _setup(tmp_path)
    before = _files(tmp_path)
    r = _run(args, tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (case, r.returncode, r.stderr[-3000:])
    for want in expected:
        assert want in lines[0], (case, want, lines[0])
    assert "weights_only" not in lines[0], lines[0]
    assert _files(tmp_path) == before, (case, sorted(_files(tmp_path) - before))
