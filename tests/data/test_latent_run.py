"""A latent run end to end on a tiny random VAE and a folder of images: convert -> encode (the ``prepared``
fixture) -> train a few steps -> the training grid, ``dfm sample`` and ``dfm generate`` are decoded RGB images
at the image resolution, with the VAE the store recorded; without one, a line says what was written instead."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

IMAGE, LATENT = 32, 16  # the fixture converts to 32x32; the tiny VAE downsamples by 2
TINY = ["model=DFM-SiT-S/4", "arch.depth=2", "arch.hidden_size=64", "arch.num_heads=2", "train.global_batch_size=6",
        "train.max_steps=4", "train.log_every=2", "train.sample_every=4", "train.ckpt_every=4", "data.num_workers=0",
        "sample.num_steps_per_scale=[2,1]", "sample.per_class=1"]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Inception and the VAE on tiny batches: two threads on two busy cores crawl
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def evaluator_files(tmp_path_factory, prepared):
    """Random Inception weights and a reference batch of 4 of the converted images."""
    import zipfile

    from dfm.evaluation.inception import InceptionV3

    root = tmp_path_factory.mktemp("evaluator")
    torch.manual_seed(0)
    state = {k: v for k, v in InceptionV3().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, root / "inception.pth")
    with zipfile.ZipFile(prepared / "images.zip") as z:
        names = [n for n, _ in json.loads(z.read("dataset.json"))["labels"]][:4]
        images = np.stack([np.asarray(Image.open(z.open(n)).convert("RGB")) for n in names])
    np.savez(root / "ref.npz", arr_0=images)
    return root / "inception.pth", root / "ref.npz"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared, evaluator_files):
    """``dfm train --data-dir <store>`` (shape and classes from the store), evaluated at its last step."""
    from dfm.launch.train import main

    out = tmp_path_factory.mktemp("runs")
    weights, ref = evaluator_files
    main(["--data-dir", str(prepared / "vae-sd"), "--exp-name", "latent", *TINY, f"output_dir={out}",
          "train.eval_every=4", "train.eval_samples=4", f"train.eval_inception_weights={weights}",
          f"train.eval_ref={ref}"])  # fmt: skip
    return out / "latent"


def vae_decode(tiny_vae, z: torch.Tensor) -> np.ndarray:
    """What decoding must give: the store's VAE on z / scaling_factor, to uint8 as every image is saved."""
    from dfm.vae import load_vae
    from dfm.visualize import to_uint8

    with torch.no_grad():
        return to_uint8(load_vae(str(tiny_vae)).decode(z / 0.18215).sample)


def test_the_store_records_its_vae(prepared, tiny_vae):
    manifest = json.loads((prepared / "vae-sd" / "manifest.json").read_text())
    assert manifest["vae"] == {"source": str(tiny_vae.resolve()), "subfolder": None, "scaling_factor": 0.18215,
                               "shift_factor": 0.0}  # fmt: skip
    assert manifest["scale"] == 0.18215 and manifest["shift"] == 0.0


def test_the_training_grid_is_decoded_rgb_at_the_image_resolution(trained, capsys):
    from dfm.config import load_config

    cfg = load_config(trained / "config.yaml")
    assert (cfg.data.resolution, cfg.data.channels, cfg.data.num_classes) == (LATENT, 4, 3)  # from the store
    grid = Image.open(trained / "samples" / "0000004.png")
    cell, scale = IMAGE + 1, 2  # 32 px images (not 16 px latents), 1 px padding, x2 below 64 px
    assert grid.mode == "RGB" and grid.size == ((2 * cell + 1) * scale, (3 * cell + 1) * scale)  # 3 classes x 2
    pixels = np.asarray(grid)[scale : scale * (IMAGE + 1), scale : scale * (IMAGE + 1)]
    assert pixels.std() > 5 and not np.array_equal(pixels[..., 0], pixels[..., 1])  # colour, not a grey channel


def test_latent_evaluation_and_its_tags(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained / "tb"))
    events.Reload()
    for tag in ("eval/fid", "eval/sfid", "eval/inception_score", "eval/seconds"):  # the README's latent tags
        (value,) = [e.value for e in events.Scalars(tag)]
        assert np.isfinite(value), tag
    (cached,) = (trained / "eval").iterdir()  # the samples removed, the reference's statistics kept
    assert cached.name.startswith("reference_stats-") and cached.suffix == ".npz"


def test_dfm_sample_decodes_with_the_stores_vae(trained, tiny_vae, tmp_path, capsys):
    from dfm.launch.sample import load_model, main

    from dfm.visualize import class_rows, sample_model

    main(["--ckpt", str(trained), "--out", str(tmp_path / "grid.png"), "--npz", str(tmp_path / "s.npz"),
          "--per-class", "2", "--device", "cpu"])  # fmt: skip
    assert f"decoding with the VAE {tiny_vae.resolve()} (recorded in the latent store)" in capsys.readouterr().out
    with np.load(tmp_path / "s.npz") as f:
        images, settings = f["arr_0"], json.loads(str(f["settings"]))
    assert images.shape == (6, IMAGE, IMAGE, 3) and images.dtype == np.uint8
    assert settings["vae"]["source"] == str(tiny_vae.resolve()) and settings["decoded"] and settings["seed"] == 0
    model, cfg = load_model(trained)
    y = class_rows(3, 2, "cpu")
    z = sample_model(model, cfg, y, generator=torch.Generator().manual_seed(0)).x
    assert np.array_equal(images, vae_decode(tiny_vae, z))


def test_dfm_generate_decodes_with_the_stores_vae(trained, tiny_vae, tmp_path):
    from dfm.launch.generate import main
    from dfm.launch.sample import load_model

    from dfm.generation import IndexSampler, read_settings

    out = tmp_path / "g.npz"
    main(["--ckpt", str(trained), "--num-samples", "3", "--batch-size", "3", "--device", "cpu", "--out", str(out)])
    with np.load(out) as f:
        images = f["arr_0"]
    assert images.shape == (3, IMAGE, IMAGE, 3)
    assert read_settings(out)["vae"]["source"] == str(tiny_vae.resolve())
    model, cfg = load_model(trained)
    z, _ = IndexSampler(model, cfg, seed=0).sample(range(3))
    assert np.array_equal(images, vae_decode(tiny_vae, z))


def test_without_a_vae_sample_says_what_it_writes_and_generate_refuses(trained, prepared, tmp_path, capsys):
    from dfm.launch.generate import main as generate
    from dfm.launch.sample import main as sample

    bare = tmp_path / "bare"
    shutil.copytree(prepared / "vae-sd", bare)
    manifest = json.loads((bare / "manifest.json").read_text())
    del manifest["vae"]
    (bare / "manifest.json").write_text(json.dumps(manifest))
    sample(["--ckpt", str(trained), "--out", str(tmp_path / "raw.png"), "--per-class", "1", "--device", "cpu",
            f"data.data_dir={bare}"])  # fmt: skip
    said = capsys.readouterr().out
    assert f"no VAE to decode with: its latent store {bare} records no VAE, and no --vae was given; writing " in said
    assert "latent channels 0-2 instead of images" in said
    cell, scale = LATENT + 1, 4  # latent-sized cells
    assert Image.open(tmp_path / "raw.png").size == ((2 * cell + 1) * scale, (3 * cell + 1) * scale)
    flags = ["--ckpt", str(trained), "--num-samples", "2", "--device", "cpu", "--out", str(tmp_path / "x.npz")]
    with pytest.raises(SystemExit, match=r"records no VAE.*pass --vae"):
        generate([*flags, f"data.data_dir={bare}"])
    assert not (tmp_path / "x.npz").exists()
