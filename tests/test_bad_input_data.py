"""Bad input to ``dfm prepare``, ``dfm evaluate`` and ``--config``: one line naming the argument, nothing lost.

Each row of ``CASES`` runs one command line through ``dfm.launch.cli.main`` (the ``dfm`` entry point) against
real files: images converted by ``dfm prepare convert``, stores encoded by ``dfm prepare encode`` with tiny
random AutoencoderKLs saved to disk, interrupted jobs left as a crash leaves them, ADM ``.npz`` batches. It
checks the exit code, that the message names the argument or file (and both values where two settings
differ), and that every file of the folders the command could touch is byte for byte as before (a folder that
did not exist must still not exist).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from data.data_testing import make_tiny_vae  # tests/data: the suite's tiny VAE
from dfm.launch.cli import main as dfm
from PIL import Image

from dfm.data import convert as convert_module

ROOT = Path(__file__).resolve().parents[1]
CPU = ["--device", "cpu", "--workers", "0"]
RESOLUTION = 16


def make_images(root: Path, classes: int = 2, per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(20, 40, 2))
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


def encode_argv(source: Path, dest: Path, vae: Path, *extra: str) -> list[str]:
    return ["prepare", "encode", "--source", str(source), "--dest", str(dest), "--vae", str(vae), "--chunk-size",
            "2", "--batch-size", "2", *CPU, *extra]  # fmt: skip


def convert_argv(source: str, dest: str, resolution: str) -> list[str]:
    return ["prepare", "convert", "--source", source, "--dest", dest, "--resolution", resolution]


def save_npz(path: Path, **arrays) -> Path:
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def interrupt_convert(source: Path, dest: Path, after: int) -> None:
    """``dfm prepare convert`` stopped by Ctrl-C after ``after`` images, as a user would stop it."""
    real = convert_module._convert_one
    calls = []

    def stopping(task):
        if len(calls) == after:
            raise KeyboardInterrupt
        calls.append(task)
        return real(task)

    convert_module._convert_one = stopping
    try:
        with pytest.raises(KeyboardInterrupt):
            convert_module.convert(source, dest, f"{RESOLUTION}", workers=1, progress=False)
    finally:
        convert_module._convert_one = real


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> dict[str, Path]:
    """Every file the cases read, made once by the real commands (module scope: each case must leave them as
    they were, which is what the cases check)."""
    root = tmp_path_factory.mktemp("bad-input")
    p = {"root": root, "raw": make_images(root / "raw"), "empty": root / "empty-source"}
    p["empty"].mkdir()
    p["vae_a"], p["vae_b"] = make_tiny_vae(root / "vae-a", 0), make_tiny_vae(root / "vae-b", 1)
    p["images"], p["images2"], p["images_zip"] = root / "images", root / "images-copy", root / "images.zip"
    for dest in (p["images"], p["images2"], p["images_zip"]):
        assert dfm(["prepare", "convert", "--source", str(p["raw"]), "--dest", str(dest), "--resolution",
                    f"{RESOLUTION}", "--workers", "1"]) == 0  # fmt: skip
    # A conversion interrupted after 2 images, and one finished by an older version that recorded no settings.
    interrupt_convert(p["raw"], root / "images-interrupted", after=2)
    p["images_interrupted"] = root / "images-interrupted"
    p["images_legacy"] = root / "images-legacy"
    shutil.copytree(p["images"], p["images_legacy"])
    index = json.loads((p["images_legacy"] / "dataset.json").read_text())
    for key in ("source", "resolution", "transform"):
        del index[key]
    (p["images_legacy"] / "dataset.json").write_text(json.dumps(index))
    # Converted from a source whose every image is unreadable: a dataset.json listing no image.
    (root / "unreadable" / "c").mkdir(parents=True)
    (root / "unreadable" / "c" / "0.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    p["images_none"] = root / "images-none"
    assert dfm(["prepare", "convert", "--source", str(root / "unreadable"), "--dest", str(p["images_none"]),
                "--workers", "1"]) == 0  # fmt: skip
    # A finished store (VAE a), and encodes interrupted half-way (rank 0 of 2 done, rank 1 crashed).
    p["store"] = root / "store"
    assert dfm(encode_argv(p["images"], p["store"], p["vae_a"])) == 0
    from dfm.data.encode import encode_shard

    p["crashed"], p["crashed_swap"], p["vae_swap"] = root / "crashed", root / "crashed-swap", root / "vae-swap"
    shutil.copytree(p["vae_a"], p["vae_swap"])
    for dest, vae in ((p["crashed"], p["vae_a"]), (p["crashed_swap"], p["vae_swap"])):
        encode_shard(p["images"], dest, vae=str(vae), chunk_size=2, batch_size=2, device="cpu", workers=0,
                     rank=0, world_size=2, progress=False)  # fmt: skip
    # The same folder now holds other weights: the path alone cannot tell the two VAEs apart.
    for f in p["vae_b"].iterdir():
        shutil.copy(f, p["vae_swap"] / f.name)
    # ADM batches: samples 16x16, reference 32x32, a file without arr_0, a stand-in for the Inception weights
    # (every refusal below comes before the weights are read).
    rng = np.random.default_rng(1)
    p["samples"] = save_npz(root / "samples.npz", arr_0=rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    p["ref16"] = save_npz(root / "ref16.npz", arr_0=rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    p["ref32"] = save_npz(root / "ref32.npz", arr_0=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    p["no_arr0"] = save_npz(root / "no-arr0.npz", images=rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    p["weights"] = root / "pt_inception-stand-in.pth"
    p["weights"].write_bytes(b"not read: every case is refused before the weights")
    p["binary_config"] = root / "config.yaml"
    p["binary_config"].write_bytes(bytes(range(256)) * 4)
    p["config_dir"] = root / "configs"
    p["config_dir"].mkdir()
    p["new"] = root / "new"  # never created by a refused command
    return p


def evaluate_argv(w: dict, samples: Path, ref: Path, *extra: str) -> list[str]:
    return ["evaluate", "--samples", str(samples), "--ref", str(ref), "--inception-weights", str(w["weights"]),
            "--device", "cpu", *extra]  # fmt: skip


@dataclass
class Case:
    argv: Callable[[dict], list[str]]
    needles: Callable[[dict], list[str]]  # what the one line must name
    watched: tuple[str, ...] = ()  # keys of ``w``: the folders and files at risk (all of ``w`` is checked too)
    code: int = 1
    stdout: Callable[[dict], list[str]] = field(default=lambda w: [])  # for exit 0: what stdout must say
    needs_no_cuda: bool = False


CASES = {
    # 2. a resumed encode records its settings and refuses others, naming both values
    "encode-resume-other-vae": Case(
        lambda w: encode_argv(w["images"], w["crashed"], w["vae_b"]),
        lambda w: ["plan.json", f"--vae {w['vae_a']} ", f"--vae {w['vae_b']}:"],
        ("crashed", "images"),
    ),
    "encode-resume-same-vae-folder-other-weights": Case(
        lambda w: encode_argv(w["images"], w["crashed_swap"], w["vae_swap"]),
        lambda w: ["plan.json", "the VAE's checksum sha256:"],
        ("crashed_swap", "vae_swap"),
    ),
    "encode-resume-other-source": Case(
        lambda w: encode_argv(w["images2"], w["crashed"], w["vae_a"]),
        lambda w: [f"--source {w['images']} ", f"--source {w['images2']}:"],
        ("crashed", "images2"),
    ),
    "encode-resume-other-dtype": Case(
        lambda w: encode_argv(w["images"], w["crashed"], w["vae_a"], "--dtype", "float16"),
        lambda w: ["--dtype float32 ", "--dtype float16:"],
        ("crashed",),
    ),
    # 3. a finished store under other settings is refused; under the same ones it says it did nothing
    "encode-finished-other-vae": Case(
        lambda w: encode_argv(w["images"], w["store"], w["vae_b"]),
        lambda w: ["manifest.json", f"--vae {w['vae_a']} ", f"--vae {w['vae_b']}:"],
        ("store",),
    ),
    "encode-finished-other-source": Case(
        lambda w: encode_argv(w["images2"], w["store"], w["vae_a"]),
        lambda w: ["manifest.json", f"--source {w['images']} ", f"--source {w['images2']}:"],
        ("store",),
    ),
    "encode-finished-same-settings": Case(
        lambda w: encode_argv(w["images"], w["store"], w["vae_a"]),
        lambda w: [],
        ("store", "images"),
        code=0,
        stdout=lambda w: ["already a complete store", "nothing to do"],
    ),
    # 4. convert records source, resolution and transform, and checks the images it keeps
    "convert-rerun-other-resolution": Case(
        lambda w: convert_argv(str(w["raw"]), str(w["images"]), "32"),
        lambda w: ["dataset.json", "--resolution 16x16", "--resolution 32x32"],
        ("images", "raw"),
    ),
    "convert-zip-rerun-other-resolution": Case(
        lambda w: convert_argv(str(w["raw"]), str(w["images_zip"]), "32"),
        lambda w: [str(w["images_zip"]), "--resolution 16x16", "--resolution 32x32"],
        ("images_zip",),
    ),
    "convert-resume-other-resolution": Case(
        lambda w: convert_argv(str(w["raw"]), str(w["images_interrupted"]), "32"),
        lambda w: ["convert-plan.json", "--resolution 16x16", "--resolution 32x32"],
        ("images_interrupted",),
    ),
    "convert-rerun-other-source": Case(
        lambda w: convert_argv(str(w["images2"]), str(w["images"]), f"{RESOLUTION}"),
        lambda w: ["--source", str(w["raw"]), str(w["images2"])],
        ("images",),
    ),
    "convert-older-folder-kept-images-of-other-size": Case(
        lambda w: convert_argv(str(w["raw"]), str(w["images_legacy"]), "32"),
        lambda w: [str(w["images_legacy"]), "is 16x16", "--resolution 32x32"],
        ("images_legacy",),
    ),
    # 9. every output path is checked before the work
    "evaluate-out-unwritable": Case(
        lambda w: evaluate_argv(w, w["samples"], w["ref16"], "--out", "/proc/nope.json"),
        lambda w: ["--out", "/proc/nope.json"],
        ("samples", "ref16"),
    ),
    "evaluate-out-is-a-folder": Case(
        lambda w: evaluate_argv(w, w["samples"], w["ref16"], "--out", str(w["config_dir"])),
        lambda w: ["--out", str(w["config_dir"]), "folder"],
        ("config_dir",),
    ),
    "evaluate-out-in-missing-folder": Case(
        lambda w: evaluate_argv(w, w["samples"], w["ref16"], "--out", str(w["new"] / "m.json")),
        lambda w: ["--out", str(w["new"]), "does not exist"],
        ("new",),
    ),
    "evaluate-out-is-an-input": Case(
        lambda w: evaluate_argv(w, w["samples"], w["ref16"], "--out", str(w["samples"])),
        lambda w: ["--out", str(w["samples"]), "input"],
        ("samples",),
    ),
    "evaluate-save-ref-stats-in-missing-folder": Case(
        lambda w: evaluate_argv(w, w["samples"], w["ref16"], "--save-ref-stats", str(w["new"] / "s.npz")),
        lambda w: ["--save-ref-stats", str(w["new"])],
        ("new",),
    ),
    # 10. one line instead of a traceback, and nothing written before the device is known to exist
    "evaluate-device-banana": Case(
        lambda w: evaluate_argv(w, w["samples"], w["ref16"], "--device", "banana"),
        lambda w: ["--device", "banana"],
        ("samples",),
    ),
    "evaluate-device-cuda-without-cuda": Case(
        lambda w: evaluate_argv(w, w["samples"], w["ref16"], "--device", "cuda"),
        lambda w: ["--device cuda", "CUDA is not available"],
        ("samples",),
        needs_no_cuda=True,
    ),
    "encode-device-banana": Case(
        lambda w: encode_argv(w["images"], w["new"], w["vae_a"], "--device", "banana"),
        lambda w: ["--device", "banana"],
        ("new", "images"),
    ),
    "encode-device-cuda-without-cuda": Case(
        lambda w: encode_argv(w["images"], w["new"], w["vae_a"], "--device", "cuda"),
        lambda w: ["--device cuda", "CUDA is not available"],
        ("new",),
        needs_no_cuda=True,
    ),
    "encode-resume-device-banana": Case(  # the plan of an interrupted job is not rewritten either
        lambda w: encode_argv(w["images"], w["crashed"], w["vae_a"], "--device", "banana"),
        lambda w: ["--device", "banana"],
        ("crashed",),
    ),
    "encode-converted-folder-without-images": Case(
        lambda w: encode_argv(w["images_none"], w["new"], w["vae_a"]),
        lambda w: [str(w["images_none"]), "lists no images"],
        ("new", "images_none"),
    ),
    "evaluate-npz-without-arr_0": Case(
        lambda w: evaluate_argv(w, w["no_arr0"], w["ref16"]),
        lambda w: [str(w["no_arr0"]), "arr_0", "images"],
        ("no_arr0",),
    ),
    "evaluate-k-not-below-the-batch-size": Case(  # precision/recall would fail after every feature is computed
        lambda w: evaluate_argv(w, w["samples"], w["ref16"], "--k", "4"),
        lambda w: ["--k 4", "--samples (4)"],
        ("samples",),
    ),
    # weak answers made clear
    "evaluate-samples-and-reference-of-other-sizes": Case(
        lambda w: evaluate_argv(w, w["samples"], w["ref32"]),
        lambda w: [str(w["samples"]), "16x16", str(w["ref32"]), "32x32"],
        ("samples", "ref32"),
    ),
    "config-is-a-folder": Case(
        lambda w: ["train", "--config", str(w["config_dir"]), "--exp-name", "x"],
        lambda w: [str(w["config_dir"]), "is a folder"],
        ("config_dir", "cwd"),
    ),
    "config-is-binary": Case(
        lambda w: ["train", "--config", str(w["binary_config"]), "--exp-name", "x"],
        lambda w: [str(w["binary_config"]), "not a text YAML file"],
        ("binary_config", "cwd"),
    ),
    "convert-empty-source": Case(
        lambda w: ["prepare", "convert", "--source", str(w["empty"]), "--dest", str(w["new"])],
        lambda w: ["no images found in", str(w["empty"])],
        ("new", "empty"),
    ),
    "convert-resolution-too-large": Case(
        lambda w: convert_argv(str(w["raw"]), str(w["new"]), "99999999x99999999"),
        lambda w: ["--resolution", "99999999x99999999"],
        ("new",),
    ),
    "encode-batch-size-zero": Case(
        lambda w: encode_argv(w["images"], w["crashed"], w["vae_a"], "--batch-size", "0"),
        lambda w: ["--batch-size", "at least 1"],
        ("crashed",),
    ),
    "convert-max-images-zero": Case(
        lambda w: [*convert_argv(str(w["raw"]), str(w["new"]), "16"), "--max-images", "0"],
        lambda w: ["--max-images", "at least 1"],
        ("new",),
    ),
    "encode-vae-path-that-does-not-exist": Case(
        lambda w: encode_argv(w["images"], w["new"], "./novae"),
        lambda w: ["novae", "does not exist"],
        ("new",),
    ),
}


def snapshot(path: Path) -> dict[str, str] | None:
    """sha256 of every file under ``path`` (``path`` itself if a file) by relative name, folders as ``dir``;
    None when it does not exist."""
    if not path.exists():
        return None
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(path)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
    }


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_naming_it_and_changes_nothing(name, w, tmp_path, monkeypatch, capsys):
    case = CASES[name]
    if case.needs_no_cuda and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    monkeypatch.chdir(tmp_path)  # relative paths (./novae) and default output folders land here
    paths = {**w, "cwd": tmp_path}
    watched = (*case.watched, "root", "cwd")
    before = {key: snapshot(paths[key]) for key in watched}
    capsys.readouterr()
    try:
        code = dfm(case.argv(w))
    except SystemExit as exit_:  # `dfm train` exits with its message, which the interpreter prints to stderr
        code, message = (exit_.code, "") if isinstance(exit_.code, int) else (1, f"{exit_.code}\n")
        print(message, end="", file=sys.stderr)
    out, err = capsys.readouterr()
    assert code == case.code, (out, err)
    if case.code:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"dfm {case.argv(w)[0]}: "), err
        for needle in case.needles(w):
            assert needle in lines[0], (needle, lines[0])
    for needle in case.stdout(w):
        assert needle in out, (needle, out)
    for key in watched:
        assert snapshot(paths[key]) == before[key], f"{key} changed"
