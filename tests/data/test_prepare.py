"""convert and encode: ADM centre crop, labels from class folders, skips, resumption, VAE moments, statistics."""

from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import pytest
import torch
from data_testing import CLASSES, PER_CLASS, make_image_folder
from PIL import Image

from dfm.data import prepare
from dfm.data.store import open_store, validate_store


def test_center_crop_dhariwal_keeps_the_centre_and_size():
    # Three vertical thirds red | green | blue, 3:1 aspect: the square centre crop must be pure green.
    w, h = 300, 100
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, :100, 0] = arr[:, 100:200, 1] = arr[:, 200:, 2] = 255
    out = prepare.center_crop_dhariwal(Image.fromarray(arr), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    centre = out[:, 2:-2]  # bicubic bleeds about two pixels across each colour edge
    assert (centre[..., 1] >= 250).all() and (centre[..., 0] <= 5).all() and (centre[..., 2] <= 5).all()
    # Already at size: untouched. Large: box-halved first, a constant image stays constant.
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(prepare.center_crop_dhariwal(Image.fromarray(img), 32), img)
    const = np.full((160, 130, 3), 77, np.uint8)
    np.testing.assert_array_equal(prepare.center_crop_dhariwal(Image.fromarray(const), 32), const[:32, :32])


def test_center_crop_dhariwal_matches_adm_arithmetic():
    # 130x70 at 32: one box halving (70 >= 64) to 65x35, bicubic to round(65*32/35)=59 x 32, crop from x=13.
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (70, 130, 3), dtype=np.uint8))
    half = img.resize((65, 35), resample=Image.BOX)
    ref = np.asarray(half.resize((59, 32), resample=Image.BICUBIC))[:, 13:45]
    np.testing.assert_array_equal(prepare.center_crop_dhariwal(img, 32), ref)


def test_resolution_and_transform_errors():
    with pytest.raises(ValueError, match="256x256"):
        prepare.parse_resolution("256")
    with pytest.raises(ValueError, match="square"):
        prepare.convert("unused", "unused", "64x32")
    with pytest.raises(ValueError, match="unknown transform"):
        prepare.convert("unused", "unused", "32x32", transform="stretch")


def test_convert_zip_labels_skips_and_rgb(prepared):
    with zipfile.ZipFile(prepared / "images.zip") as z:
        index = json.loads(z.read("dataset.json"))
        names = [n for n, _ in index["labels"]]
        assert len(names) == len(CLASSES) * PER_CLASS  # the truncated JPEG is not among them
        assert index["classes"] == list(CLASSES)
        assert [y for _, y in index["labels"]] == [c for c in range(len(CLASSES)) for _ in range(PER_CLASS)]
        assert [s[0] for s in index["skipped"]] == [f"{CLASSES[1]}/truncated.JPEG"]
        for i, (name, label) in enumerate(index["labels"]):
            assert name == prepare.output_name(i if i < 10 else i + 1)  # the skipped source (index 10) leaves a gap
            img = np.asarray(Image.open(z.open(name)))
            assert img.shape == (32, 32, 3)  # grey and RGBA sources became RGB
            if i % PER_CLASS != 1:  # colour sources: the class's saturated channel shows the label is right
                means = img.reshape(-1, 3).mean(0)
                assert means[label] > 220 and np.delete(means, label).max() < 160


def test_convert_resumes_and_counts(tmp_path):
    src = make_image_folder(tmp_path / "raw")
    dest = tmp_path / "images"
    first = prepare.convert(src, dest, "16x16", workers=1, progress=False)
    assert (first.written, first.reused, len(first.skipped)) == (15, 0, 1)
    victim = dest / prepare.output_name(4)
    victim.unlink()
    kept = (dest / prepare.output_name(0)).stat().st_mtime_ns
    again = prepare.convert(src, dest, "16x16", workers=2, progress=False)
    assert (again.written, again.reused, len(again.skipped)) == (1, 14, 1)
    assert victim.exists() and (dest / prepare.output_name(0)).stat().st_mtime_ns == kept
    assert len(json.loads((dest / "dataset.json").read_text())["labels"]) == 15
    # A zip of the same folder converts to the same pixels.
    zipped = shutil.make_archive(str(tmp_path / "raw"), "zip", src)
    from_zip = prepare.convert(zipped, tmp_path / "from_zip", "16x16", workers=1, progress=False)
    assert (from_zip.written, len(from_zip.skipped)) == (15, 1)
    for i in (0, 7, 15):
        a, b = (np.asarray(Image.open(d / prepare.output_name(i))) for d in (dest, tmp_path / "from_zip"))
        np.testing.assert_array_equal(a, b)


def test_encode_stores_vae_moments_labels_and_stats(prepared, tiny_vae):
    store = validate_store(prepared, deep=True)  # the parent directory resolves to vae-sd/, as in the seed
    assert store.root == prepared / "vae-sd" and store.layout == "packed"
    assert (store.count, store.shape, store.num_classes) == (15, (8, 16, 16), 3)
    assert store.dtype == np.float32 and store.scale == pytest.approx(0.18215)
    np.testing.assert_array_equal(store.labels, np.repeat(np.arange(3), PER_CLASS))
    assert not (prepared / "vae-sd" / "parts").exists()  # packed, then the parts were removed

    # Moments equal the VAE run directly on the converted images.
    vae = prepare.load_vae(str(tiny_vae))
    with zipfile.ZipFile(prepared / "images.zip") as z:
        names = [n for n, _ in json.loads(z.read("dataset.json"))["labels"]]
        images = torch.stack([torch.from_numpy(np.array(Image.open(z.open(n)))).permute(2, 0, 1) for n in names])
    with torch.no_grad():
        dist = vae.encode(images.float() / 127.5 - 1).latent_dist
    np.testing.assert_allclose(store.moments[:, :4], dist.mean.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(store.moments[:, 4:], dist.std.numpy(), rtol=0, atol=1e-5)

    # Statistics of z = mean + std * n are exact functions of the moments.
    m = np.asarray(store.moments, dtype=np.float64)
    mu = m[:, :4].mean(axis=(0, 2, 3))
    var = (m[:, :4] ** 2 + m[:, 4:] ** 2).mean(axis=(0, 2, 3)) - mu**2
    np.testing.assert_allclose(store.stats["mean"], mu, rtol=1e-10)
    np.testing.assert_allclose(store.stats["std"], np.sqrt(var), rtol=1e-10)


def test_cli_validate_reports_the_store(prepared, capsys):
    from dfm.launch.prepare import main

    assert main(["validate", "--data-dir", str(prepared), "--world-size", "2", "--deep"]) == 0
    assert "packed store, 15 samples of (8, 16, 16) float32, 3 classes: ok" in capsys.readouterr().out


def test_encode_by_rank_resumes_and_matches_one_process(tmp_path, prepared, tiny_vae):
    src = prepared / "images.zip"
    common = dict(vae=str(tiny_vae), batch_size=3, chunk_size=4, device="cpu", workers=0, progress=False)
    # Rank 0 of 2 alone: even chunks only; the store cannot be packed yet.
    prepare.encode_shard(src, tmp_path / "sharded", rank=0, world_size=2, **common)
    assert prepare.missing_parts(tmp_path / "sharded") == [1, 3]
    with pytest.raises(RuntimeError, match="not encoded yet"):
        prepare.finalize_store(tmp_path / "sharded")
    # Rank 1 encodes its chunks and leaves packing to rank 0, which finds every chunk done and packs (files
    # layout); running again on a finished store returns its manifest untouched.
    assert prepare.encode(src, tmp_path / "sharded", rank=1, world_size=2, **common) is None
    assert prepare.missing_parts(tmp_path / "sharded") == []
    assert prepare.encode(src, tmp_path / "sharded", rank=0, world_size=2, layout="files", **common)["count"] == 15
    assert prepare.encode(src, tmp_path / "sharded", rank=0, world_size=2, **common)["layout"] == "files"
    sharded = validate_store(tmp_path / "sharded", deep=True)
    whole = open_store(prepared)
    assert sharded.layout == "files" and sharded.count == whole.count
    np.testing.assert_array_equal(sharded.labels, whole.labels)
    np.testing.assert_allclose(sharded.gather(np.arange(whole.count)), whole.moments, rtol=0, atol=1e-5)


def test_encode_float16_with_two_processes(tmp_path, prepared, tiny_vae):
    manifest = prepare.encode(
        prepared / "images.zip", tmp_path / "f16", vae=str(tiny_vae), procs=2, dtype="float16", batch_size=8,
        chunk_size=4, device="cpu", workers=0, progress=False,
    )  # fmt: skip
    assert manifest["dtype"] == "float16" and manifest["count"] == 15
    f16, f32 = open_store(tmp_path / "f16"), open_store(prepared)
    np.testing.assert_allclose(f16.moments, f32.moments, rtol=2e-3, atol=2e-3)  # fp16 rounding only


def _broken_converted_folder(tmp_path, prepared):
    folder = tmp_path / "converted"
    with zipfile.ZipFile(prepared / "images.zip") as z:
        z.extractall(folder)
    names = [n for n, _ in json.loads((folder / "dataset.json").read_text())["labels"]]
    (folder / names[5]).write_bytes(b"\x89PNG broken")
    return folder, names[5]


def test_encode_bad_image_is_named_or_skipped_and_counted(tmp_path, prepared, tiny_vae):
    folder, bad = _broken_converted_folder(tmp_path, prepared)
    common = dict(vae=str(tiny_vae), batch_size=4, chunk_size=8, device="cpu", workers=0, progress=False)
    with pytest.raises(ValueError, match=rf"cannot encode .*{bad}.*--skip-bad"):
        prepare.encode(folder, tmp_path / "strict", **common)
    manifest = prepare.encode(folder, tmp_path / "lenient", skip_bad=True, **common)
    assert manifest["count"] == 14 and [s[0] for s in manifest["skipped"]] == [bad]
    store = validate_store(tmp_path / "lenient")
    np.testing.assert_array_equal(store.moments, np.delete(open_store(prepared).moments, 5, axis=0))
    np.testing.assert_array_equal(store.labels, np.delete(open_store(prepared).labels, 5))


def test_encode_needs_converted_images(tmp_path, image_folder, tiny_vae):
    with pytest.raises(FileNotFoundError, match="dfm prepare convert"):
        prepare.encode(image_folder, tmp_path / "x", vae=str(tiny_vae), device="cpu", workers=0, progress=False)
