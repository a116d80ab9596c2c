"""Captions of the shapes world: every object named with its count, distinct sentences, and a
fixed number per image even when the sentence forms run out."""

from __future__ import annotations

import numpy as np

from distill.data.world_captions import background_phrase, captions


def test_captions_name_every_object_with_counts_and_are_distinct():
    names = ["red star", "blue circle", "orange cross"]
    objs = [{"class": 0, "center": (10.0, 10.0)}, {"class": 1, "center": (40.0, 12.0)}, {"class": 1, "center": (5.0, 50.0)},
            {"class": 2, "center": (60.0, 60.0)}]
    caps = captions(np.random.default_rng(0), names, objs, "striped", 4)
    assert len(caps) == len(set(caps)) == 4
    for c in caps:
        assert "a red star" in c and "two blue circles" in c and "an orange cross" in c
    again = captions(np.random.default_rng(0), names, objs, "striped", 4)
    assert again == caps  # the image's rng decides everything


def test_more_captions_than_forms_repeat_one_and_background_phrase():
    caps = captions(np.random.default_rng(1), ["red star"], [{"class": 0, "center": (1.0, 1.0)}], "plain", 12)
    assert len(caps) == 12 and len(set(caps)) < 12 and all("a red star" in c for c in caps)
    assert background_phrase("plain") == "a plain background" and background_phrase("ornate") == "an ornate background"
