"""Robust decoding: every format made here with Pillow, bad files, folder listing."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from distill.data.images import list_images, load_image, relative_names
from distill.errors import DistillError


def _rgb(h=24, w=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("ext,fmt", [("png", "PNG"), ("bmp", "BMP"), ("tiff", "TIFF"), ("tif", "TIFF")])
def test_lossless_rgb_roundtrip(tmp_path, ext, fmt):
    a = _rgb()
    p = tmp_path / f"x.{ext}"
    Image.fromarray(a).save(p, fmt)
    out = load_image(p)
    assert out.dtype == np.uint8 and out.shape == (24, 32, 3)
    np.testing.assert_array_equal(out, a)


def test_lossless_webp_and_jpeg_close(tmp_path):
    a = np.zeros((32, 32, 3), np.uint8)
    a[:, :16] = (200, 30, 40)
    a[:, 16:] = (10, 180, 90)
    Image.fromarray(a).save(tmp_path / "x.webp", "WEBP", lossless=True)
    np.testing.assert_array_equal(load_image(tmp_path / "x.webp"), a)
    Image.fromarray(a).save(tmp_path / "x.JPG", "JPEG", quality=95)
    out = load_image(tmp_path / "x.JPG").astype(int)
    assert np.abs(out[:, 2:14] - a[:, 2:14]).max() <= 8


def test_grayscale_and_bilevel(tmp_path):
    g = _rgb()[..., 0]
    Image.fromarray(g, "L").save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    assert out.shape == (24, 32, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)
    b = (g > 128)
    Image.fromarray(b).convert("1").save(tmp_path / "b.png")
    out = load_image(tmp_path / "b.png")
    np.testing.assert_array_equal(out[..., 0], np.where(b, 255, 0))


def test_sixteen_bit_png_keeps_high_byte(tmp_path):
    a = (np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 85).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    out = load_image(tmp_path / "d.png")
    np.testing.assert_array_equal(out[..., 1], (a >> 8).astype(np.uint8))


def test_palette_with_and_without_transparency(tmp_path):
    idx = np.zeros((8, 8), np.uint8)
    idx[:, 4:] = 1
    im = Image.fromarray(idx, "P")
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.save(tmp_path / "p.png")
    out = load_image(tmp_path / "p.png")
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[0, 7]) == (0, 0, 255)
    im.save(tmp_path / "pt.png", transparency=0)  # index 0 transparent -> white
    out = load_image(tmp_path / "pt.png")
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 7]) == (0, 0, 255)


def test_rgba_composited_over_white(tmp_path):
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0] = 200
    a[..., 3] = 255
    a[0, 0, 3] = 0  # fully transparent
    a[1, 1, 3] = 128  # half
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png").astype(int)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[2, 2]) == (200, 0, 0)
    # 128/255 * 200 + 127/255 * 255 = 227.4; G = B = 127/255 * 255 = 127
    assert abs(out[1, 1, 0] - 227) <= 1 and abs(out[1, 1, 1] - 127) <= 1


def test_cmyk_jpeg(tmp_path):
    a = np.zeros((16, 16, 3), np.uint8)
    a[...] = (0, 200, 0)
    Image.fromarray(a).convert("CMYK").save(tmp_path / "c.jpg", "JPEG", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    out = load_image(tmp_path / "c.jpg").astype(int)
    assert out.shape == (16, 16, 3)
    assert np.abs(out[4:12, 4:12] - np.array([0, 200, 0])).max() <= 10


def test_exif_orientation_6_rotates(tmp_path):
    # Stored 20 high x 40 wide, left half red; orientation 6 = "rotate 90 CW to display".
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "r.jpg", "JPEG", quality=95, exif=exif.tobytes())
    out = load_image(tmp_path / "r.jpg")
    assert out.shape == (40, 20, 3)
    # After a 90 deg clockwise turn the stored left (red) half is on top.
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 50
    assert out[35, 10, 2] > 200 and out[35, 10, 0] < 50
    np.testing.assert_array_equal(out, np.rot90(load_image_no_exif(tmp_path / "r.jpg"), k=-1))


def load_image_no_exif(p):
    with Image.open(p) as im:
        return np.asarray(im.convert("RGB"))


def test_one_by_one(tmp_path):
    Image.fromarray(np.full((1, 1, 3), 7, np.uint8)).save(tmp_path / "t.png")
    assert load_image(tmp_path / "t.png").tolist() == [[[7, 7, 7]]]


def test_truncated_file(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DistillError, match=r"t\.jpg: truncated or corrupt"):
        load_image(tmp_path / "t.jpg")
    buf = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buf, "PNG")
    (tmp_path / "t.png").write_bytes(buf.getvalue()[:200])
    with pytest.raises(DistillError, match=r"t\.png: truncated or corrupt"):
        load_image(tmp_path / "t.png")


def test_zero_byte_and_text_and_missing(tmp_path):
    (tmp_path / "z.png").write_bytes(b"")
    with pytest.raises(DistillError, match=r"z\.png: empty file \(0 bytes\)"):
        load_image(tmp_path / "z.png")
    (tmp_path / "notes.jpg").write_text("this is not a picture\n")
    with pytest.raises(DistillError, match=r"notes\.jpg: not an image"):
        load_image(tmp_path / "notes.jpg")
    with pytest.raises(DistillError, match="file not found"):
        load_image(tmp_path / "nope.png")


def test_decompression_bomb_header(tmp_path):
    Image.new("L", (300, 300)).save(tmp_path / "big.png")
    with pytest.raises(DistillError, match=r"big\.png: 300x300 = 90000 pixels exceeds the limit of 1000"):
        load_image(tmp_path / "big.png", max_pixels=1000)
    assert load_image(tmp_path / "big.png").shape == (300, 300, 3)


def test_list_images_recursive_sorted_case_insensitive(tmp_path):
    for rel in ["b/2.PNG", "a/x.jpg", "a/sub/y.JpEg", "c.webp", "d.tif", "e.bmp", "notes.txt", ".hidden/z.png", ".tmp.png"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    got = relative_names(tmp_path, list_images(tmp_path))
    assert got == ["a/sub/y.JpEg", "a/x.jpg", "b/2.PNG", "c.webp", "d.tif", "e.bmp"]
    assert list_images(tmp_path) == list_images(str(tmp_path))  # deterministic


def test_duplicate_names_in_different_folders_stay_distinct(tmp_path):
    for rel in ["cam1/0001.png", "cam2/0001.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_rgb()).save(tmp_path / rel)
    names = relative_names(tmp_path, list_images(tmp_path))
    assert names == ["cam1/0001.png", "cam2/0001.png"]


def test_list_file(tmp_path):
    (tmp_path / "imgs").mkdir()
    for n in ["a.png", "b.png"]:
        (tmp_path / "imgs" / n).write_bytes(b"x")
    lst = tmp_path / "list.txt"
    lst.write_text("# two images\nimgs/b.png\n\nimgs/a.png\nimgs/b.png\n")
    paths = list_images(lst)
    assert [p.name for p in paths] == ["b.png", "a.png"]
    assert relative_names(lst, paths) == ["imgs/b.png", "imgs/a.png"]
    (tmp_path / "bad.txt").write_text("imgs/a.gifx\n")
    with pytest.raises(DistillError, match=r"bad\.txt:1: 'imgs/a\.gifx' is not an image name"):
        list_images(tmp_path / "bad.txt")


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.md").write_text("no images")
    with pytest.raises(DistillError, match=r"empty: no images found"):
        list_images(tmp_path / "empty")
    with pytest.raises(DistillError, match="not found"):
        list_images(tmp_path / "missing")
