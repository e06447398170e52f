"""Latent stores from any diffusers ``AutoencoderKL``: a FLUX-shaped one (16 latent channels, scaling 0.3611 and
shift 0.1159 in its config) through encode, training, the decoded grid and ``dfm generate``, with its own
channels and factors everywhere the SD VAE's 4 channels and 0.18215 would otherwise be assumed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from data_testing import make_tiny_vae
from PIL import Image

FLUX_SCALE, FLUX_SHIFT, CHANNELS = 0.3611, 0.1159, 16
TINY = ["model=DFM-SiT-S/4", "arch.depth=2", "arch.hidden_size=64", "arch.num_heads=2", "train.global_batch_size=6",
        "train.max_steps=2", "train.log_every=2", "train.sample_every=2", "train.ckpt_every=2", "data.num_workers=0",
        "train.eval_every=0", "sample.num_steps_per_scale=[2,1]", "sample.per_class=1"]  # fmt: skip


@pytest.fixture(scope="module")
def flux_vae(tmp_path_factory):
    """A 2-level AutoencoderKL with FLUX's latent channels and factors, random weights, saved like a hub VAE."""
    return make_tiny_vae(
        tmp_path_factory.mktemp("vae") / "tiny-flux",
        seed=0,
        latent_channels=CHANNELS,
        scaling_factor=FLUX_SCALE,
        shift_factor=FLUX_SHIFT,
    )


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory, prepared, flux_vae):
    from dfm.launch.prepare import main as prepare
    from dfm.launch.train import main as train

    root = tmp_path_factory.mktemp("flux")
    prepare(["encode", "--source", str(prepared / "images.zip"), "--dest", str(root / "store"), "--vae", str(flux_vae),
             "--batch-size", "4", "--chunk-size", "6", "--workers", "0", "--device", "cpu"])  # fmt: skip
    torch.set_num_threads(1)
    train(["--data-dir", str(root / "store"), "--exp-name", "flux", *TINY, f"output_dir={root / 'runs'}"])
    return root


def test_the_store_has_the_vaes_channels_and_factors(flux_run, flux_vae):
    manifest = json.loads((flux_run / "store" / "manifest.json").read_text())
    assert manifest["vae"]["scaling_factor"] == FLUX_SCALE and manifest["vae"]["shift_factor"] == FLUX_SHIFT
    assert manifest["scale"] == FLUX_SCALE and manifest["shift"] == FLUX_SHIFT
    assert manifest["shape"][0] == 2 * CHANNELS  # mean and std per latent channel


def test_training_takes_the_channels_and_decodes_with_the_shift(flux_run):
    from dfm.config import load_config

    run = flux_run / "runs" / "flux"
    cfg = load_config(run / "config.yaml")
    assert cfg.data.channels == CHANNELS and cfg.data.resolution == 16
    grid = Image.open(run / "samples" / "0000002.png")
    assert grid.mode == "RGB" and np.asarray(grid).std() > 5  # decoded images, not latent channels


def test_the_decoder_undoes_scale_and_shift(flux_vae):
    from dfm.vae import LatentDecoder, load_vae, vae_spec

    spec = vae_spec(str(flux_vae))
    assert (spec.scaling_factor, spec.shift_factor) == (FLUX_SCALE, FLUX_SHIFT)
    z = torch.randn(2, CHANNELS, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_vae(str(flux_vae)).decode(z / FLUX_SCALE + FLUX_SHIFT).sample
        got = LatentDecoder.load(spec)(z)
    assert torch.equal(got, want)
    with torch.no_grad():  # and the shift is not a no-op here: without it the images differ
        assert not torch.allclose(load_vae(str(flux_vae)).decode(z / FLUX_SCALE).sample, want, atol=1e-3)


def test_dfm_generate_writes_decoded_images(flux_run, tmp_path):
    from dfm.launch.generate import main

    out = tmp_path / "g.npz"
    main(["--ckpt", str(flux_run / "runs" / "flux"), "--num-samples", "2", "--batch-size", "2", "--device", "cpu",
          "--out", str(out)])  # fmt: skip
    with np.load(out) as f:
        assert f["arr_0"].shape == (2, 32, 32, 3) and f["arr_0"].dtype == np.uint8
