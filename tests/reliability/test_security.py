"""Security: checkpoints only through ``torch.load(weights_only=True)``, YAML only through the safe
loader, no pickle / eval of user files, and no output path escaping its output folder through
names taken from input files (COCO ``file_name``, image-label ``file_name``, image list files).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distill.cli import main

from ._fixtures import REPO, cli_error, make_teacher_dir, make_tiny_world, teacher_overrides, world_overrides

# ------------------------------------------------------------------------------------ static scan

UNSAFE_CALLS = {
    "pickle.load", "pickle.loads", "cPickle.load", "dill.load", "dill.loads", "joblib.load", "_pickle.load", "_pickle.loads",
    *(f"yaml.{name}" for name in ("load", "load_all", "unsafe_load", "full_load", "unsafe_load_all", "full_load_all")),
    "marshal.loads", "marshal.load", "shelve.open", "pickle.Unpickler", "_pickle.Unpickler",
}
TORCH_LOADS = {"torch.load", "torch.serialization.load"}
NUMPY_LOADS = {"numpy.load"}
UNSAFE_YAML_LOADERS = {"yaml.Loader", "yaml.UnsafeLoader", "yaml.FullLoader"}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Every name an import binds -> the dotted name it stands for, wherever the import is:
    ``import torch as T`` -> {T: torch}, ``from torch import load as L`` -> {L: torch.load},
    ``import torch.serialization`` -> {torch: torch}. Module-wide, so an alias made inside a
    function is seen too (a false positive is an edit away; a miss is a hole)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    names[a.asname] = a.name
                else:
                    top = a.name.split(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.AST, names: dict[str, str]) -> str | None:
    """``T.serialization.load`` -> ``torch.serialization.load`` (through the import aliases)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    base = names.get(node.id, node.id)
    base = {"np": "numpy"}.get(base, base)
    return ".".join([base, *reversed(parts)])


def scan_source(text: str, where: str) -> tuple[list[str], int]:
    """Problems found in one Python source, and how many torch.load calls it has. Calls are
    matched by what they resolve to through the file's imports (``from torch import load as L``;
    ``import torch as T; T.load(...)``); a torch.load that is named but not called (``f = torch.load``,
    ``partial(torch.load, ...)``) is a problem too, since the call it ends in cannot be checked."""
    tree = ast.parse(text)
    names = _aliases(tree)
    problems: list[str] = []
    n_torch_load = 0
    called = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        called.add(id(node.func))
        q = _dotted(node.func, names)
        kw = {k.arg: k.value for k in node.keywords}
        at = f"{where}:{node.lineno}"
        if q in TORCH_LOADS:
            n_torch_load += 1
            v = kw.get("weights_only")
            if not (isinstance(v, ast.Constant) and v.value is True):
                problems.append(f"{at}: torch.load without weights_only=True")
        elif q in UNSAFE_CALLS:
            problems.append(f"{at}: {q}")
        elif q in NUMPY_LOADS:
            v = kw.get("allow_pickle")
            if v is not None and not (isinstance(v, ast.Constant) and v.value is False):
                problems.append(f"{at}: numpy load with allow_pickle")
        elif q in ("eval", "exec", "builtins.eval", "builtins.exec"):
            problems.append(f"{at}: {q.split('.')[-1]}()")
    for node in ast.walk(tree):
        if isinstance(node, (ast.Attribute, ast.Name)) and id(node) not in called and isinstance(getattr(node, "ctx", None), ast.Load):
            q = _dotted(node, names)
            if q in TORCH_LOADS:
                problems.append(f"{where}:{node.lineno}: {q} referenced without a call (weights_only cannot be checked)")
            elif q in UNSAFE_YAML_LOADERS:
                problems.append(f"{where}:{node.lineno}: {q}")
    return problems, n_torch_load


def test_scanner_catches_unsafe_code():
    bad = (
        "import torch, yaml, pickle, numpy as np\n"
        # (split so that grep-based house checks do not flag this deliberately unsafe sample)
        "torch." "load('a.pt')\n"
        "torch." "load('a.pt', weights_only=False)\n"
        "torch." "load('a.pt', map_location='cpu', weights_only=True)\n"
        "yaml." "load(open('c.yaml'))\n"
        "yaml.safe_load(open('c.yaml'))\n"
        "pickle.loads(b'')\n"
        "np.load('x.npy', allow_pickle=True)\n"
        "np.load('x.npz')\n"
        "eval('1')\n"
    )
    problems, n = scan_source(bad, "x.py")
    assert n == 3
    assert [p.split(": ", 1)[1] for p in problems] == [
        "torch.load without weights_only=True", "torch.load without weights_only=True", "yaml.load",
        "pickle.loads", "numpy load with allow_pickle", "eval()",
    ]
    assert [int(p.split(":")[1]) for p in problems] == [2, 3, 5, 7, 8, 10]


def test_scanner_sees_through_import_aliases():
    """The unsafe calls under other names: an aliased module, a function imported by (another)
    name, a submodule path, a torch.load handed on uncalled. Each line is one problem."""
    bad = (
        "import torch as T, yaml as Y, numpy\n"  # 1
        "from torch import load as L\n"  # 2
        "from torch import load\n"  # 3
        "from pickle import loads as pl\n"  # 4
        "import torch.serialization\n"  # 5
        "from functools import partial\n"  # 6
        "T.load('a.pt')\n"  # 7
        "L('a.pt', map_location='cpu')\n"  # 8
        "load('a.pt', weights_only=False)\n"  # 9
        "torch.serialization.load('a.pt')\n"  # 10
        "T.load('a.pt', weights_only=True)\n"  # 11: fine
        "L('a.pt', weights_only=True)\n"  # 12: fine
        "f = T.load\n"  # 13
        "g = partial(L, weights_only=False)\n"  # 14
        "Y.load(open('c.yaml'), Loader=Y.FullLoader)\n"  # 15: both
        "pl(b'')\n"  # 16
        "numpy.load('x.npy', allow_pickle=True)\n"  # 17
    )
    problems, n = scan_source(bad, "x.py")
    assert n == 6
    lines = sorted(int(p.split(":")[1]) for p in problems)
    assert lines == [7, 8, 9, 10, 13, 14, 15, 15, 16, 17], problems
    assert [int(p.split(":")[1]) for p in problems if p.endswith("torch.load without weights_only=True")] == [7, 8, 9, 10]
    assert [p for p in problems if ":13:" in p or ":14:" in p] == [
        "x.py:13: torch.load referenced without a call (weights_only cannot be checked)",
        "x.py:14: torch.load referenced without a call (weights_only cannot be checked)",
    ]
    # a module that only shares the names is not flagged
    ok = "from distill.engine.checkpoint import load\nload('a.pt')\nimport json as yaml\nyaml.loads('{}')\n"
    assert scan_source(ok, "y.py") == ([], 0)


def test_package_and_tools_load_only_safely():
    files = sorted((REPO / "distill").rglob("*.py")) + sorted((REPO / "tools").rglob("*.py")) + sorted((REPO / "bench").rglob("*.py"))
    assert len(files) > 40
    problems, n_loads = [], 0
    for p in files:
        probs, n = scan_source(p.read_text(encoding="utf-8"), str(p.relative_to(REPO)))
        problems += probs
        n_loads += n
    assert problems == []
    assert n_loads >= 2  # the checkpoint and weight readers are really scanned
    # and every YAML read in the package goes through config/load.py's safe loader
    yaml_users = [p for p in files if "yaml." in p.read_text(encoding="utf-8") and "safe_load" in p.read_text(encoding="utf-8")]
    assert REPO / "distill" / "config" / "load.py" in yaml_users


# ------------------------------------------------------------------------------------ path escapes


def test_coco_file_name_escaping_the_image_root_is_refused_by_the_loader(tmp_path):
    from distill.data.coco import CocoDetection
    from distill.errors import DistillError

    root = tmp_path / "images"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(b"")
    base = {"annotations": [], "categories": [{"id": 1, "name": "red square"}]}
    for name in ("../secret.png", str(tmp_path / "secret.png"), "a/../../secret.png"):
        j = tmp_path / "c.json"
        j.write_text(json.dumps({**base, "images": [{"id": 1, "file_name": name, "width": 8, "height": 8}]}))
        with pytest.raises(DistillError, match="file_name"):
            CocoDetection(j, root)


@pytest.fixture(scope="module")
def teacher_model(tmp_path_factory):
    return make_teacher_dir(tmp_path_factory.mktemp("teacher") / "t", seed=0)


@pytest.mark.parametrize("escape", ["dotdot", "absolute"])
def test_train_det_with_escaping_file_name_is_a_one_line_error(tmp_path, teacher_model, capsys, escape):
    make_tiny_world(tmp_path / "w")
    data = tmp_path / "w" / "data"
    coco = json.loads((data / "instances_train_base.json").read_text())
    coco["images"][0]["file_name"] = "../../../etc/passwd" if escape == "dotdot" else "/etc/passwd"
    evil = tmp_path / "evil.json"
    evil.write_text(json.dumps(coco))
    line = cli_error(capsys, ["train", "det", str(REPO / "configs/shapes/world.yaml"), *world_overrides(tmp_path / "w"),
                              *teacher_overrides(teacher_model), f"data.train_json={evil}", "det.use_image=false",
                              "det.train.max_steps=1", "det.train.device=cpu"])
    assert "evil.json" in line and "file_name" in line
    assert not (tmp_path / "w" / "det").exists() or not any((tmp_path / "w" / "det").rglob("model_final.pt"))


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def _scene(seed):
    rng = np.random.default_rng(seed)
    img = rng.integers(100, 140, size=(40, 40, 3), dtype=np.uint8)
    img[5:20, 8:24] = (220, 30, 30)
    return img


def test_label_outputs_stay_in_the_output_folder(tmp_path, teacher_model, capsys):
    """Images named from a list file with ../ and absolute entries, and odd file names: every file
    written lands under --out."""
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    Image.fromarray(_scene(0)).save(tmp_path / "a" / "deep" / "x.png")
    Image.fromarray(_scene(1)).save(tmp_path / "b" / "..y.png")
    Image.fromarray(_scene(2)).save(tmp_path / "b" / "..\\..\\z.png")  # a backslash is a plain character here
    lst = tmp_path / "a" / "deep" / "list.txt"
    lst.write_text(f"x.png\n../../b/..y.png\n{tmp_path / 'b' / '..'}/b/..\\..\\z.png\n")
    out = tmp_path / "run" / "labels"
    before = _files(tmp_path)
    assert main(["label", "--images", str(lst), "--vocab", "red square, blue circle", "--model", "teacher", "--out", str(out),
                 "--format", "coco,yolo,png", "--score-thresh", "0", *teacher_overrides(teacher_model)]) == 0
    new = _files(tmp_path) - before
    assert new, "labeling wrote nothing"
    outside = sorted(str(p) for p in new if out.resolve() not in p.resolve().parents)
    assert outside == []
    coco = json.loads((out / "labels.json").read_text())
    assert len(coco["images"]) == 3
    assert all(".." not in Path(im["file_name"]).parts and not Path(im["file_name"]).is_absolute() for im in coco["images"])


def test_cam_outputs_stay_in_the_output_folder(tmp_path, teacher_model, capsys):
    """An image-labels json whose file_name re-enters the image folder through ../ (so the image is
    found) must not steer the mask / seed outputs out of cam.out."""
    root = tmp_path / "imgs"
    root.mkdir()
    Image.fromarray(_scene(0)).save(root / "x.png")
    Image.fromarray(_scene(1)).save(root / "y.png")
    up = "../" * len(root.resolve().parts[1:])
    escape = f"{up}{str(root.resolve())[1:]}/y.png"  # ../../.../tmp/.../imgs/y.png == imgs/y.png
    assert (root / escape).resolve() == (root / "y.png").resolve()
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps([{"image_id": 1, "file_name": "x.png", "category_ids": [1]},
                                  {"image_id": 2, "file_name": escape, "category_ids": [1]}]))
    out = tmp_path / "run" / "cam"
    before = _files(tmp_path)
    from distill.cli import main as cli_main

    capsys.readouterr()
    rc = cli_main(["cam", str(REPO / "configs/shapes/cam.yaml"), "--images", str(root), "--labels", str(labels),
                   *teacher_overrides(teacher_model), f"cam.out={out}", "cam.vocab=red square, blue circle",
                   "cam.background=", "cam.num_panels=0", "cam.image_size=32"])
    err = capsys.readouterr().err
    new = _files(tmp_path) - before
    outside = sorted(str(p) for p in new if out.resolve() not in p.resolve().parents)
    assert outside == [], f"written outside {out}: {outside}"
    # where a naive out / "masks" / file_name would have written (outside tmp_path altogether)
    targets = [(out / sub / escape).with_suffix(ext).resolve() for sub, ext in (("masks", ".png"), ("seeds", ".npz"))]
    assert all(out.resolve() not in t.parents for t in targets)
    hit = [str(t) for t in targets if t.exists()]
    for t in targets:
        t.unlink(missing_ok=True)
    assert hit == [], f"cam wrote outside cam.out: {hit}"
    # either refused with a one-line error naming the entry, or written inside cam.out
    if rc != 0:
        assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1 and "y.png" in err
    else:
        assert len(list((out / "masks").rglob("*.png"))) == 2
