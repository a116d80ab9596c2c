import dataclasses
from pathlib import Path

import pytest

from distill.config import Config, config_from_dict, dump_config, load_config, parse_override, save_config, to_dict
from distill.errors import DistillError


def write(p, text):
    p.write_text(text)
    return p


def test_defaults_and_work_dir_expansion():
    cfg = load_config(None, ["work_dir=runs/x"])
    assert cfg.data.val_json == "runs/x/data/instances_val.json"
    assert cfg.teacher.pretrained == "runs/x/teacher/teacher.safetensors"
    assert isinstance(cfg.det.train.max_steps, int)


def test_overrides_are_typed(tmp_path):
    cfg = load_config(None, ["det.train.lr=0.5", "det.train.max_steps=7", "det.masks=true", "world.novel=[red star, blue circle]", "regions.scales=1,1.5"])
    assert cfg.det.train.lr == 0.5 and isinstance(cfg.det.train.lr, float)
    assert cfg.det.train.max_steps == 7
    assert cfg.det.masks is True
    assert cfg.world.novel == ("red star", "blue circle")
    assert cfg.regions.scales == (1.0, 1.5)


def test_unknown_key_lists_valid_and_closest(tmp_path):
    with pytest.raises(DistillError) as e:
        load_config(None, ["det.trian.lr=0.1"])
    msg = str(e.value)
    assert "det.trian" in msg and "did you mean 'train'" in msg and "backbone" in msg
    p = write(tmp_path / "c.yaml", "wrold:\n  seed: 1\n")
    with pytest.raises(DistillError, match="did you mean 'world'"):
        load_config(p)


@pytest.mark.parametrize(
    "override, expect",
    [("det.train.max_steps=abc", "expected an int"), ("det.masks=maybe", "expected a bool"), ("det.train.lr=[1,2]", "expected a float"), ("world", "key.sub=value")],
)
def test_wrong_types(override, expect):
    with pytest.raises(DistillError, match=expect):
        load_config(None, [override])


def test_defaults_file_merge_and_list_of_parents(tmp_path):
    write(tmp_path / "base.yaml", "work_dir: runs/b\nworld:\n  seed: 1\n  num_train: 10\n")
    child = write(tmp_path / "child.yaml", "defaults: base.yaml\nworld:\n  seed: 2\n")
    cfg = load_config(child)
    assert (cfg.world.seed, cfg.world.num_train, cfg.work_dir) == (2, 10, "runs/b")
    # several parents: merged in order (a later one wins), the file itself on top
    write(tmp_path / "other.yaml", "world:\n  num_train: 20\n  num_val: 5\ncam:\n  bg_power: 3.0\n")
    two = write(tmp_path / "two.yaml", "defaults: [base.yaml, other.yaml]\nworld:\n  num_val: 6\n")
    cfg = load_config(two)
    assert (cfg.world.seed, cfg.world.num_train, cfg.world.num_val, cfg.cam.bg_power, cfg.work_dir) == (1, 20, 6, 3.0, "runs/b")
    for text in ("defaults: []\n", "defaults: {a: b}\n", "defaults: [base.yaml, 3]\n"):
        bad = write(tmp_path / "bad.yaml", text)
        with pytest.raises(DistillError, match="'defaults' must name a file or a list of files"):
            load_config(bad)
    missing = write(tmp_path / "missing.yaml", "defaults: [base.yaml, gone.yaml]\n")
    with pytest.raises(DistillError, match="gone.yaml: config file not found"):
        load_config(missing)
    cyc = write(tmp_path / "cyc.yaml", "defaults: cyc.yaml\n")
    with pytest.raises(DistillError, match="cycle"):
        load_config(cyc)


def test_yaml_python_tags_and_garbage_are_refused(tmp_path):
    p = write(tmp_path / "evil.yaml", "work_dir: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(DistillError, match="not valid YAML"):
        load_config(p)
    p = write(tmp_path / "list.yaml", "- a\n- b\n")
    with pytest.raises(DistillError, match="expected a mapping"):
        load_config(p)
    with pytest.raises(DistillError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_roundtrip_and_frozen(tmp_path):
    cfg = load_config(None, ["world.seed=5", "det.train.lr=0.3"])
    save_config(cfg, tmp_path / "cfg.yaml")
    again = load_config(tmp_path / "cfg.yaml")
    assert again == cfg
    assert config_from_dict(to_dict(cfg)) == cfg
    assert "seed: 5" in dump_config(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.world.seed = 3  # type: ignore[misc]


def test_parse_override_yaml_scalars():
    assert parse_override("a.b=0.5") == (["a", "b"], 0.5)
    assert load_config(None, ["det.train.lr=1e-3"]).det.train.lr == 1e-3
    assert parse_override("a=") == (["a"], "")
    assert parse_override("a.b=x=y") == (["a", "b"], "x=y")


def test_shipped_configs_load():
    import glob

    files = sorted(glob.glob("configs/**/*.yaml", recursive=True))
    for f in files:
        cfg = load_config(f)
        assert isinstance(cfg, Config), f


def test_word_list_settings_hold_their_words_from_any_folder(tmp_path, monkeypatch):
    """Templates and background words are read once, when the config is loaded: a bundled config
    means the same from any folder (shipped prompt files are found by name), a saved config.yaml
    reloads to the same config elsewhere, and a missing file names its key."""
    from distill.config import load_config, save_config
    from distill.errors import DistillError
    from distill.files import PROMPTS_DIR

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    here = load_config("configs/shapes/pipeline.yaml")
    monkeypatch.chdir(tmp_path)
    there = load_config(repo / "configs/shapes/pipeline.yaml")
    assert here == there
    shipped = [ln.strip() for ln in (PROMPTS_DIR / "shapes.txt").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert there.teacher.templates.splitlines() == shipped and len(shipped) > 3
    assert "plain background" in there.cam.background.splitlines()
    save_config(there, tmp_path / "saved.yaml")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert load_config(tmp_path / "saved.yaml") == there
    # a user's file relative to the working directory wins over a shipped name; literal templates
    (tmp_path / "sub" / "shapes.txt").write_text("\ufeff# mine\na drawing of a {}.\n", encoding="utf-8")
    assert load_config(None, ["teacher.templates=shapes.txt"]).teacher.templates == "a drawing of a {}.\n"
    assert load_config(None, ["teacher.templates=a sketch of a {}."]).teacher.templates == "a sketch of a {}.\n"
    for bad, words in (("teacher.templates=nosuch.txt", ["teacher.templates", "nosuch.txt", "not found", "shapes.txt"]),
                       ("cam.background=gone/words.txt", ["cam.background", "gone/words.txt"]),
                       ("label.background=[sky, gone.txt]", ["label.background", "gone.txt"]),
                       ("teacher.templates=a {} and a {}.", ["teacher.templates", "exactly one"])):
        with pytest.raises(DistillError) as e:
            load_config(None, [bad])
        assert all(w in str(e.value) for w in words) and "\n" not in str(e.value), (bad, str(e.value))


@pytest.mark.parametrize("override, message", [
    ("cam.tower=dense_towr", "cam.tower: 'dense_towr' is not one of teacher, dense_tower; did you mean 'dense_tower'?"),
    ("cam.resize=sqaure", "cam.resize: 'sqaure' is not one of square, patch_multiple; did you mean 'square'?"),
    ("det.image_head=seperate", "det.image_head: 'seperate' is not one of shared, separate; did you mean 'separate'?"),
    ("seg.arch=unet", "seg.arch: 'unet' is not one of lseg, clipseg"),
    ("regions.precision=bf16", "regions.precision: 'bf16' is not one of '', fp32, amp_bf16, amp_fp16, auto; did you mean 'amp_bf16'?"),
    ("det.train.schedule=linear", "det.train.schedule: 'linear' is not one of cosine, step, poly, constant"),
])
def test_enum_like_keys_are_checked_at_load(override, message):
    """A misspelt choice is refused when the config is read, with the valid values (before: e.g.
    cam.tower=dens silently used the dense tower, cam.resize=sqaure the patch_multiple resize)."""
    with pytest.raises(DistillError) as e:
        load_config(None, [override])
    assert str(e.value) == message


def test_renamed_keys_name_the_new_one_and_stored_configs_read_them():
    """A config with an old name (the CLIPSelf tower had seven) is a one-line error naming the new
    one; a stored config (a checkpoint's, a finished run's config.yaml) is read under the new names."""
    old = {"teacher": {"dense_pretrained": "t.safetensors"}, "cam": {"tower": "dense"}, "seg": {"backbone": "teacher_dense"}}
    with pytest.raises(DistillError, match=r"^config key 'teacher.dense_pretrained' was renamed: use 'teacher.dense_tower'$"):
        config_from_dict(old)
    with pytest.raises(DistillError, match=r"^cam.tower: 'dense' was renamed: use cam.tower=dense_tower$"):
        load_config(None, ["cam.tower=dense"])
    cfg = config_from_dict(old, stored=True)
    assert (cfg.teacher.dense_tower, cfg.cam.tower, cfg.seg.backbone) == ("t.safetensors", "dense_tower", "dense_tower")


def test_pipeline_reads_the_stage_configs_as_they_are():
    """configs/shapes/pipeline.yaml names vild.yaml, lseg.yaml and cam.yaml as its defaults instead of
    copying their sections: the demo's cam and seg settings are those of `distill cam` /
    `distill train seg` with those files (seg.distill_weight aside: the seg stage trains both)."""
    root = Path(__file__).resolve().parents[1] / "configs" / "shapes"
    pipe = load_config(root / "pipeline.yaml")
    assert pipe.cam == load_config(root / "cam.yaml").cam
    assert pipe.seg == dataclasses.replace(load_config(root / "lseg.yaml").seg, distill_weight=1.0)
    assert pipe.det == load_config(root / "vild.yaml").det
    assert pipe.teacher == load_config(root / "cam.yaml").teacher == load_config(root / "lseg.yaml").teacher


def test_maskclip_refinement_thresholds_are_probabilities():
    """teacher.key_smoothing / prompt_denoising are the reference's probability thresholds in [0, 1]."""
    from distill.config.sections import TeacherConfig

    assert TeacherConfig(key_smoothing=1.0, prompt_denoising=0.5).prompt_denoising == 0.5
    for key in ("key_smoothing", "prompt_denoising"):
        with pytest.raises(DistillError, match=f"teacher.{key}: expected a probability threshold in \\[0, 1\\]"):
            TeacherConfig(**{key: 1.5})
