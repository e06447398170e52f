"""encode: VAE moments, labels and statistics in a store; ranks, resumption, float16, bad images."""

from __future__ import annotations

import json
import shutil
import time
import zipfile

import numpy as np
import pytest
import torch
from data_testing import PER_CLASS, make_tiny_vae
from PIL import Image

from dfm.data import encode
from dfm.data.store import open_store, validate_store
from dfm.vae import load_vae


def test_encode_stores_vae_moments_labels_and_stats(prepared, tiny_vae):
    store = validate_store(prepared, deep=True)  # the parent directory resolves to vae-sd/, as in the seed
    assert store.root == prepared / "vae-sd" and store.layout == "packed"
    assert (store.count, store.shape, store.num_classes) == (15, (8, 16, 16), 3)
    assert store.dtype == np.float32 and store.scale == pytest.approx(0.18215)
    np.testing.assert_array_equal(store.labels, np.repeat(np.arange(3), PER_CLASS))
    assert not (prepared / "vae-sd" / "parts").exists()  # packed, then the parts were removed

    # Moments equal the VAE run directly on the converted images.
    vae = load_vae(str(tiny_vae))
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


def test_encode_by_rank_resumes_and_matches_one_process(tmp_path, prepared, tiny_vae):
    src = prepared / "images.zip"
    common = dict(vae=str(tiny_vae), batch_size=3, chunk_size=4, device="cpu", workers=0, progress=False)
    # Rank 0 of 2 alone: even chunks only; the store cannot be packed yet.
    encode.encode_shard(src, tmp_path / "sharded", rank=0, world_size=2, **common)
    assert encode.missing_parts(tmp_path / "sharded") == [1, 3]
    parts = sorted(p.name for p in (tmp_path / "sharded" / "parts").iterdir())
    assert parts == ["chunk-000000.npz", "chunk-000002.npz", "plan.json"]  # written whole, no temporaries left
    with pytest.raises(RuntimeError, match="not encoded yet"):
        encode.finalize_store(tmp_path / "sharded")
    # Rank 1 encodes its chunks and leaves packing to rank 0, which finds every chunk done and packs (files
    # layout); running again on a finished store returns its manifest untouched.
    assert encode.encode(src, tmp_path / "sharded", rank=1, world_size=2, **common) is None
    assert encode.missing_parts(tmp_path / "sharded") == []
    assert encode.encode(src, tmp_path / "sharded", rank=0, world_size=2, layout="files", **common)["count"] == 15
    assert encode.encode(src, tmp_path / "sharded", rank=0, world_size=2, layout="files", **common)["layout"] == "files"
    with pytest.raises(ValueError, match="records --layout files but this run has --layout packed"):
        encode.encode(src, tmp_path / "sharded", rank=0, world_size=2, **common)
    gone = src.rename(tmp_path / "images-deleted.zip")  # converted images are often deleted once encoded
    try:
        again = encode.encode(src, tmp_path / "sharded", rank=0, world_size=2, layout="files", **common)
        assert again["count"] == 15  # the finished store, compared with the source by its path
    finally:
        gone.rename(src)
    sharded = validate_store(tmp_path / "sharded", deep=True)
    whole = open_store(prepared)
    assert sharded.layout == "files" and sharded.count == whole.count
    np.testing.assert_array_equal(sharded.labels, whole.labels)
    np.testing.assert_allclose(sharded.gather(np.arange(whole.count)), whole.moments, rtol=0, atol=1e-5)


def test_a_resume_refuses_another_vae_but_takes_a_copy_of_the_same(tmp_path, prepared, tiny_vae):
    """The plan records the VAE with a checksum of its files: other weights are refused whatever their path, the
    same files under another path (a copy, another machine's mount) resume, and the store equals a whole run's."""
    src, dest = prepared / "images.zip", tmp_path / "store"
    common = dict(batch_size=3, chunk_size=4, device="cpu", workers=0, progress=False)
    encode.encode_shard(src, dest, vae=str(tiny_vae), rank=0, world_size=2, **common)  # rank 1 never ran
    copy = shutil.copytree(tiny_vae, tmp_path / "copy")
    plan = (dest / "parts" / "plan.json").read_bytes()
    other = make_tiny_vae(tmp_path / "other")  # same config, other random weights
    with pytest.raises(ValueError, match=r"plan.json records --vae .* but this run has --vae .*other"):
        encode.encode(src, dest, vae=str(other), **common)
    assert (dest / "parts" / "plan.json").read_bytes() == plan and encode.missing_parts(dest) == [1, 3]
    manifest = encode.encode(src, dest, vae=str(copy), **common)
    assert manifest["count"] == 15
    np.testing.assert_allclose(open_store(dest).moments, open_store(prepared).moments, rtol=0, atol=1e-5)


def test_encode_float16_with_two_processes(tmp_path, prepared, tiny_vae):
    manifest = encode.encode(
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
        encode.encode(folder, tmp_path / "strict", **common)
    manifest = encode.encode(folder, tmp_path / "lenient", skip_bad=True, **common)
    assert manifest["count"] == 14 and [s[0] for s in manifest["skipped"]] == [bad]
    store = validate_store(tmp_path / "lenient")
    np.testing.assert_array_equal(store.moments, np.delete(open_store(prepared).moments, 5, axis=0))
    np.testing.assert_array_equal(store.labels, np.delete(open_store(prepared).labels, 5))


def test_encode_needs_converted_images(tmp_path, image_folder, tiny_vae):
    with pytest.raises(FileNotFoundError, match="dfm prepare convert"):
        encode.encode(image_folder, tmp_path / "x", vae=str(tiny_vae), device="cpu", workers=0, progress=False)


def test_an_unreadable_vae_is_one_line_and_leaves_no_store(tmp_path, prepared, monkeypatch, capsys):
    """A hub name neither cached nor reachable (offline), or a folder that is no VAE: refused before ``--dest``
    exists, in one line naming the VAE, without waiting for the hub's retries."""
    from dfm.launch.cli import run_command
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 before the first import
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "not-a-vae").mkdir()
    cases = {
        "no-such-org/no-such-vae": "is neither a local folder nor in the Hugging Face cache, and the hub cannot be "
        "reached (HF_HUB_OFFLINE is set): download it where there is network",
        str(tmp_path / "not-a-vae"): f"VAE folder {tmp_path / 'not-a-vae'} holds no diffusers AutoencoderKL",
    }
    for vae, needle in cases.items():
        dest = tmp_path / "store"
        argv = ["encode", "--source", str(prepared / "images.zip"), "--dest", str(dest), "--vae", vae]
        tic = time.perf_counter()
        assert run_command("prepare", argv) == 1
        assert time.perf_counter() - tic < 10  # no retry loop against an unreachable hub
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("dfm prepare: ") and needle in err, err
        assert not dest.exists()
