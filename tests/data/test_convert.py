"""convert: ADM centre crop, labels from class folders, skips, resumption, folder and zip sources."""

from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import pytest
from data_testing import CLASSES, PER_CLASS, make_image_folder
from PIL import Image

from dfm.data import convert


def test_center_crop_dhariwal_keeps_the_centre_and_size():
    # Three vertical thirds red | green | blue, 3:1 aspect: the square centre crop must be pure green.
    w, h = 300, 100
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, :100, 0] = arr[:, 100:200, 1] = arr[:, 200:, 2] = 255
    out = convert.center_crop_dhariwal(Image.fromarray(arr), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    centre = out[:, 2:-2]  # bicubic bleeds about two pixels across each colour edge
    assert (centre[..., 1] >= 250).all() and (centre[..., 0] <= 5).all() and (centre[..., 2] <= 5).all()
    # Already at size: untouched. Large: box-halved first, a constant image stays constant.
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(convert.center_crop_dhariwal(Image.fromarray(img), 32), img)
    const = np.full((160, 130, 3), 77, np.uint8)
    np.testing.assert_array_equal(convert.center_crop_dhariwal(Image.fromarray(const), 32), const[:32, :32])


def test_center_crop_dhariwal_matches_adm_arithmetic():
    # 130x70 at 32: one box halving (70 >= 64) to 65x35, bicubic to round(65*32/35)=59 x 32, crop from x=13.
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (70, 130, 3), dtype=np.uint8))
    half = img.resize((65, 35), resample=Image.BOX)
    ref = np.asarray(half.resize((59, 32), resample=Image.BICUBIC))[:, 13:45]
    np.testing.assert_array_equal(convert.center_crop_dhariwal(img, 32), ref)


def test_resolution_and_transform_errors():
    assert convert.parse_resolution("64") == (64, 64) and convert.parse_resolution("64X32") == (64, 32)
    for bad in ("256x", "x", "64x32x16", "big"):
        with pytest.raises(ValueError, match="256x256"):
            convert.parse_resolution(bad)
    with pytest.raises(ValueError, match="square"):
        convert.convert("unused", "unused", "64x32")
    with pytest.raises(ValueError, match="unknown transform"):
        convert.convert("unused", "unused", "32x32", transform="stretch")


def test_convert_zip_labels_skips_and_rgb(prepared):
    assert sorted(p.name for p in prepared.iterdir()) == ["images.zip", "vae-sd"]  # no staging folder or temporary
    with zipfile.ZipFile(prepared / "images.zip") as z:
        index = json.loads(z.read("dataset.json"))
        names = [n for n, _ in index["labels"]]
        assert len(names) == len(CLASSES) * PER_CLASS  # the truncated JPEG is not among them
        assert index["classes"] == list(CLASSES)
        assert [y for _, y in index["labels"]] == [c for c in range(len(CLASSES)) for _ in range(PER_CLASS)]
        assert [s[0] for s in index["skipped"]] == [f"{CLASSES[1]}/truncated.JPEG"]
        for i, (name, label) in enumerate(index["labels"]):
            assert name == convert.output_name(i if i < 10 else i + 1)  # the skipped source (index 10) leaves a gap
            img = np.asarray(Image.open(z.open(name)))
            assert img.shape == (32, 32, 3)  # grey and RGBA sources became RGB
            if i % PER_CLASS != 1:  # colour sources: the class's saturated channel shows the label is right
                means = img.reshape(-1, 3).mean(0)
                assert means[label] > 220 and np.delete(means, label).max() < 160


def test_convert_resumes_and_counts(tmp_path):
    src = make_image_folder(tmp_path / "raw")
    dest = tmp_path / "images"
    first = convert.convert(src, dest, "16x16", workers=1, progress=False)
    assert (first.written, first.reused, len(first.skipped)) == (15, 0, 1)
    victim = dest / convert.output_name(4)
    victim.unlink()
    kept = (dest / convert.output_name(0)).stat().st_mtime_ns
    again = convert.convert(src, dest, "16x16", workers=2, progress=False)
    assert (again.written, again.reused, len(again.skipped)) == (1, 14, 1)
    assert victim.exists() and (dest / convert.output_name(0)).stat().st_mtime_ns == kept
    assert len(json.loads((dest / "dataset.json").read_text())["labels"]) == 15
    assert not [p for p in dest.rglob("*") if ".tmp" in p.name]  # every image was renamed into place
    # A zip of the same folder converts to the same pixels.
    zipped = shutil.make_archive(str(tmp_path / "raw"), "zip", src)
    from_zip = convert.convert(zipped, tmp_path / "from_zip", "16x16", workers=1, progress=False)
    assert (from_zip.written, len(from_zip.skipped)) == (15, 1)
    for i in (0, 7, 15):
        a, b = (np.asarray(Image.open(d / convert.output_name(i))) for d in (dest, tmp_path / "from_zip"))
        np.testing.assert_array_equal(a, b)


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    from dfm.data.convert import to_rgb

    grey16 = np.array([[0, 257 * 100], [257 * 200, 65535]], dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")  # a 16-bit greyscale PNG, as scanners write them
    with Image.open(tmp_path / "g16.png") as img:
        img.load()
        assert img.mode.startswith("I")
        rgb = np.asarray(to_rgb(img))
        clipped = np.asarray(img.convert("RGB"))  # what PIL alone does
    assert rgb.shape == (2, 2, 3) and rgb[..., 0].tolist() == [[0, 100], [200, 255]]
    assert clipped[0, 1, 0] == 255 and clipped[1, 0, 0] == 255  # 100 and 200 turn white
    with pytest.raises(ValueError, match="mode F"):
        to_rgb(Image.fromarray(np.zeros((2, 2), np.float32)))


def test_class_folders_at_any_depth_and_images_at_the_top(tmp_path):
    from dfm.data.convert import ImageSource, scan_source

    def put(name):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name)

    for name in ("n01/a.png", "n01/extra/b.png", "n02/c.png"):  # ImageNet-like, one class with a subfolder
        put(name)
    entries, classes = scan_source(ImageSource(tmp_path))
    assert classes == ["n01", "n02"] and dict(entries) == {"n01/a.png": 0, "n01/extra/b.png": 0, "n02/c.png": 1}
    put("stray.png")
    with pytest.raises(ValueError, match=r"1 images lie at the top \(e\.g\. stray\.png\) beside class folders"):
        scan_source(ImageSource(tmp_path))
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(flat / f"{i}.png")
    entries, classes = scan_source(ImageSource(flat))
    assert classes == ["flat"] and [y for _, y in entries] == [0, 0]
