"""Fixtures for the data tests (helpers in data_testing.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from data_testing import index_coded_moments, make_image_folder, make_tiny_vae

from dfm.data.store import write_store


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory) -> Path:
    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, image_folder, tiny_vae) -> Path:
    """``dfm prepare convert`` then ``dfm prepare encode`` through the CLI: ``<root>/images.zip``, ``<root>/vae-sd``."""
    from dfm.launch.prepare import main

    root = tmp_path_factory.mktemp("prepared")
    main(["convert", "--source", str(image_folder), "--dest", str(root / "images.zip"), "--resolution", "32x32",
          "--workers", "2"])  # fmt: skip
    main(["encode", "--source", str(root / "images.zip"), "--dest", str(root / "vae-sd"), "--vae", str(tiny_vae),
          "--batch-size", "4", "--chunk-size", "6", "--workers", "0", "--device", "cpu"])  # fmt: skip
    return root


@pytest.fixture
def coded_store(tmp_path):
    """Factory: an index-coded store of ``count`` samples, labels ``index % num_classes``."""

    def make(count=23, std=0.0, layout="packed", num_classes=5, dtype=np.float32, name="store"):
        moments = index_coded_moments(count, std=std, dtype=dtype)
        return write_store(tmp_path / name, moments, np.arange(count) % num_classes, num_classes, layout=layout)

    return make
