"""Captions of the shapes world's images (distill/data/world.py): several distinct sentences per
image, each naming every visible object's colour and shape with counts, some with the background
or a spatial relation. Every choice is drawn from the image's own ``rng``, after its drawing."""

from __future__ import annotations

import numpy as np

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def background_phrase(bg_word: str) -> str:
    """``"a plain background"``: the caption of an image without visible objects."""
    return f"{_article(bg_word)} {bg_word} background"


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x", "ch", "sh")) else "s")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(name: str, count: int) -> str:
    color, shape = name.split(" ", 1)
    if count == 1:
        return f"{_article(color)} {color} {shape}"
    return f"{_NUMBER_WORDS[count] if count < len(_NUMBER_WORDS) else count} {color} {_plural(shape)}"


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _relation(a: dict, b: dict) -> str:
    dx = b["center"][0] - a["center"][0]
    dy = b["center"][1] - a["center"][1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def captions(rng: np.random.Generator, names: list[str], objs: list[dict], bg_word: str, n: int) -> list[str]:
    """``n`` distinct captions, each naming every object's colour and shape (with counts);
    ``objs``: the image's visible objects (``{"class": index into names, "center": (x, y)}``)."""
    counts: dict[str, int] = {}
    for o in objs:
        counts[names[o["class"]]] = counts.get(names[o["class"]], 0) + 1
    order = list(counts)
    bg_phrase = background_phrase(bg_word)

    def listing() -> str:
        perm = rng.permutation(len(order))
        return _join([_phrase(order[i], counts[order[i]]) for i in perm])

    def relational() -> str | None:
        singles = [o for o in objs if counts[names[o["class"]]] == 1]
        if len(singles) < 2:
            return None
        i, j = rng.choice(len(singles), 2, replace=False)
        a, b = singles[i], singles[j]
        na, nb = names[a["class"]], names[b["class"]]
        head = f"{_phrase(na, 1)} {_relation(a, b)} {_phrase(nb, 1)}"
        rest = [_phrase(k, counts[k]) for k in order if k not in (na, nb)]
        return head + (", with " + _join(rest) if rest else "")

    forms = [
        lambda: listing(),
        lambda: f"a picture with {listing()} on {bg_phrase}",
        lambda: f"an image of {listing()}",
        lambda: f"there {'is' if len(objs) == 1 else 'are'} {listing()} in this picture",
        lambda: f"{listing()} on {bg_phrase}",
        lambda: f"a photo showing {listing()}",
        relational,
    ]
    out: list[str] = []
    for _ in range(8 * n):
        c = forms[int(rng.integers(len(forms)))]()
        if c and c not in out:
            out.append(c)
        if len(out) == n:
            break
    while len(out) < n:  # more captions asked than there are distinct forms: repeat one
        out.append(out[len(out) % max(len(out), 1)] if out else listing())
    return out
