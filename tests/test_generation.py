"""``dfm generate`` end to end on CPU (real checkpoints, real torchrun ranks, real VAE decode) and the digits
study's smoke run: every index exactly once, 2 ranks == 1 rank bitwise, crash + resume without duplicates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dfm.launch.generate import main as generate_main
from dfm.launch.sample import load_model
from safetensors.torch import save_file

from dfm import generation
from dfm.config import load_config, save_config
from dfm.models import DFMSiT
from dfm.visualize import to_uint8

ROOT = Path(__file__).resolve().parent.parent
TINY = ["arch.depth=2", "arch.hidden_size=64", "arch.num_heads=2", "sample.num_steps_per_scale=[2,1]"]
N, BATCH = 10, 3  # pieces [0,3) [3,6) [6,9) [9,10): a short last batch, and ranks with unequal work


def save_checkpoint_dir(path: Path, cfg, seed: int = 0) -> Path:
    """A checkpoint directory as training writes it for sampling: ``ema.safetensors`` + ``config.yaml``.

    The weights are the model's init plus noise: adaLN-Zero alone would give v = 0 and images = noise.
    """
    from dfm.launch.train import measure_stage_statistics

    measure_stage_statistics(cfg)  # dfm.normalize_stages: the statistics a run stores in its config
    torch.manual_seed(seed)
    model = DFMSiT.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "ema.safetensors"))
    save_config(cfg, path / "config.yaml")
    return path


@pytest.fixture(scope="module")
def pixel_ckpt(tmp_path_factory) -> Path:
    cfg = load_config(ROOT / "configs" / "dfm_digits.yaml", TINY)
    return save_checkpoint_dir(tmp_path_factory.mktemp("ckpt") / "0000004", cfg)


@pytest.fixture
def one_thread():
    """torchrun gives each rank one intra-op thread; the in-process reference uses the same kernels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def clean_env() -> dict:
    """The environment without the rendezvous variables that in-process runs set (as in test_train), and
    without GPUs: the ranks are compared with a CPU run bitwise."""
    dist_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    return env | {"PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           str(ROOT / "launch" / "generate.py"), *args]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return res


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


# -- the plan -------------------------------------------------------------------------------------------------


def test_plan_covers_every_index_once_and_resumes_only_the_gaps():
    fresh = generation.plan_pieces(generation.missing_ranges([], 10), 3)
    assert fresh == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert generation.rank_pieces(fresh, 0, 2) == [(0, 3), (6, 9)]
    assert generation.rank_pieces(fresh, 1, 2) == [(3, 6), (9, 10)]
    # a crash lost [3, 6) and [9, 10); an earlier run with batch 2 left [6, 8)
    done = [(0, 3), (6, 8), (8, 9)]
    gaps = generation.missing_ranges(done, 10)
    assert gaps == [(3, 6), (9, 10)]
    resumed = generation.plan_pieces(gaps, 4)
    assert resumed == [(3, 4), (4, 6), (9, 10)]  # cut at multiples of the batch size
    covered = sorted(i for a, b in done + resumed for i in range(a, b))
    assert covered == list(range(10))


def test_draws_depend_only_on_seed_and_index():
    shapes = [(1, 8, 8), (1, 16, 16)]
    a = generation.draw_indices([5, 6, 7], seed=3, shapes=shapes, num_classes=10)
    b = generation.draw_indices([7, 2], seed=3, shapes=shapes, num_classes=10)
    assert a.y[2] == b.y[0]
    for s in range(2):
        assert torch.equal(a.noise[s][2], b.noise[s][0])
        assert not torch.equal(a.noise[s][1], a.noise[s][2])
    assert torch.equal(a.step_noise()[2], b.step_noise()[0])
    other_seed = generation.draw_indices([7], seed=4, shapes=shapes, num_classes=10)
    assert not torch.equal(other_seed.noise[0][0], b.noise[0][0])
    balanced = generation.draw_indices(range(20), seed=3, shapes=shapes, num_classes=10, labels="balanced")
    assert balanced.y.tolist() == [i % 10 for i in range(20)]


@pytest.mark.parametrize("mode", ["ode", "sde"])
def test_sample_of_an_index_does_not_depend_on_its_batch(pixel_ckpt, tmp_path, mode):
    """Same index in another batch (other size, other neighbours, padding): the same sample up to float32
    rounding of the batched matmuls (measured ~1e-7 here; a wrong draw would differ by O(1))."""
    if mode == "ode":
        model, cfg = load_model(pixel_ckpt)
    else:  # the SiT baseline's Euler-Maruyama sampler: its step noise must follow the index too
        cfg = load_config(ROOT / "configs" / "sit_digits.yaml", TINY[:3] + ["sample.mode=sde", "sample.num_steps=4"])
        model, cfg = load_model(save_checkpoint_dir(tmp_path / "sit", cfg))
    sampler = generation.IndexSampler(model, cfg, seed=1)
    x_all, y_all = sampler.sample(range(6))
    x_part, y_part = sampler.sample([4, 5], pad_to=5)
    assert x_part.shape[0] == 2 and torch.equal(y_part, y_all[4:])
    assert (x_part - x_all[4:]).abs().max() <= 1e-5
    assert (x_all[4] - x_all[5]).abs().max() > 0.1  # distinct indices, distinct samples


# -- the command ----------------------------------------------------------------------------------------------


def test_two_ranks_with_crash_and_resume_equal_one_rank_bitwise(pixel_ckpt, tmp_path, one_thread):
    out = tmp_path / "two" / "samples.npz"
    parts = generation.parts_dir(out)
    flags = ["--device", "cpu", "--ckpt", str(pixel_ckpt), "--num-samples", str(N), "--batch-size", str(BATCH),
             "--out", str(out)]  # fmt: skip
    # "crash": each rank stops after its first batch
    res = torchrun(*flags, "--max-batches", "1")
    assert "run the same command to continue" in res.stdout
    assert not out.exists() and generation.scan_shards(parts) == [(0, 3), (3, 6)]
    (parts / ".00000006-00000009.npz.tmp999").write_bytes(b"half a shard")  # killed while writing
    first = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.npz")}
    # resume: only [6, 9) and [9, 10) are produced; rank 0 merges and removes the parts
    res = torchrun(*flags, "--keep-parts")
    assert "4 to go" in res.stdout and out.is_file()
    assert {p.name: p.stat().st_mtime_ns for p in parts.glob("*.npz") if p.name in first} == first
    assert not list(parts.glob(".*.tmp*"))
    assert generation.scan_shards(parts) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    two = load_npz(out)

    ref = tmp_path / "one" / "samples.npz"
    assert generate_main(flags[:-1] + [str(ref)]) == ref
    one = load_npz(ref)
    assert not generation.parts_dir(ref).exists()  # removed after the merge
    assert two["arr_0"].shape == (N, 16, 16, 3) and two["arr_0"].dtype == np.uint8
    assert set(two) == {"arr_0", "arr_1", "labels", "settings"} and np.array_equal(two["arr_1"], two["labels"])
    settings = generation.read_settings(out)  # what made the images travels with them (equal at 1 and 2 ranks)
    assert settings["checkpoint"] == str(pixel_ckpt.resolve()) and settings["seed"] == 0
    assert settings["num_samples"] == N and settings["sample"]["cfg_scale"] == 1.0 and settings["vae"] is None
    assert len(np.unique(two["arr_0"].reshape(N, -1), axis=0)) == N  # N distinct samples, none twice
    for key in two:
        assert np.array_equal(two[key], one[key]), key
    expected = generation.draw_indices(range(N), 0, [(1, 8, 8), (1, 16, 16)], 10).y.numpy()
    assert np.array_equal(one["labels"], expected)


def test_lost_shards_are_regenerated_and_settings_are_checked(pixel_ckpt, tmp_path, one_thread, capsys):
    out = tmp_path / "s.npz"
    flags = ["--device", "cpu", "--ckpt", str(pixel_ckpt), "--num-samples", str(N), "--batch-size", str(BATCH),
             "--out", str(out)]  # fmt: skip
    generate_main(flags + ["--keep-parts", "--labels", "balanced"])
    full = load_npz(out)
    assert full["labels"].tolist() == [i % 10 for i in range(N)]
    parts = generation.parts_dir(out)
    (parts / "00000003-00000006.npz").unlink()
    out.unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.npz")}
    # other settings must not be mixed into these shards
    with pytest.raises(SystemExit, match="seed: 0 -> 7"):
        generate_main(flags + ["--labels", "balanced", "--seed", "7"])
    # a different batch size is fine: only the lost indices are produced, in batches of 2
    generate_main(flags[:-3] + ["2", "--out", str(out), "--keep-parts", "--labels", "balanced"])
    assert {p.name: p.stat().st_mtime_ns for p in parts.glob("*.npz") if p.name in kept} == kept
    assert generation.scan_shards(parts) == [(0, 3), (3, 4), (4, 6), (6, 9), (9, 10)]
    again = load_npz(out)
    assert np.array_equal(again["labels"], full["labels"])
    # batch 2 instead of 3: float rounding of the matmuls may move a pixel by one level, no more
    diff = np.abs(again["arr_0"].astype(int) - full["arr_0"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    capsys.readouterr()
    assert generate_main(flags + ["--labels", "balanced"]) == out  # complete: nothing to do
    assert "already exists, made with these settings" in capsys.readouterr().out
    with pytest.raises(
        SystemExit, match=r"already exists, made with other settings \(labels: 'balanced' -> 'random'\)"
    ):
        generate_main(flags)  # another sample set is not called done


def test_truncated_shards_are_redone_and_one_job_per_out(pixel_ckpt, tmp_path, one_thread, capsys):
    from dfm.files import FolderLock

    out = tmp_path / "s.npz"
    flags = ["--device", "cpu", "--ckpt", str(pixel_ckpt), "--num-samples", str(N), "--batch-size", str(BATCH),
             "--out", str(out), "--keep-parts"]  # fmt: skip
    generate_main(flags)
    full = load_npz(out)
    out.unlink()
    parts = generation.parts_dir(out)
    shard = parts / "00000003-00000006.npz"
    shard.write_bytes(shard.read_bytes()[:200])  # a shard cut short (a disk error, a copy interrupted)
    with FolderLock(parts, "dfm generate") as lock:  # another job on this --out holds the folder
        lock.announce()  # and has started: the refusal names it
        with pytest.raises(SystemExit, match=r"s\.npz\.parts is in use by pid"):
            generate_main(flags)
    assert len(shard.read_bytes()) == 200  # the refused job changed nothing
    capsys.readouterr()
    generate_main(flags)
    assert "redoing 00000003-00000006.npz (unreadable" in capsys.readouterr().out
    assert (parts / ".bad-00000003-00000006.npz").is_file()  # set aside, not deleted
    assert np.array_equal(load_npz(out)["arr_0"], full["arr_0"])  # the same images, sampled again


def test_latent_model_decodes_with_the_vae(tmp_path, one_thread):
    from data.data_testing import make_tiny_vae
    from diffusers import AutoencoderKL

    make_tiny_vae(tmp_path / "vae")  # a random 2x-upsampling decoder, 4 latent channels
    cfg = load_config(
        ROOT / "configs" / "dfm_digits.yaml",
        TINY
        + [
            "data.kind=latents",
            "data.data_dir=unused",
            "data.channels=4",
            "data.resolution=8",
            "dfm.normalize_stages=false",
        ],  # no store to measure
    )
    ckpt = save_checkpoint_dir(tmp_path / "ckpt", cfg)
    out = tmp_path / "latent.npz"
    flags = ["--device", "cpu", "--ckpt", str(ckpt), "--num-samples", "5", "--batch-size", "4", "--out", str(out)]
    with pytest.raises(SystemExit, match="--vae"):
        generate_main(flags)
    generate_main(flags + ["--vae", str(tmp_path / "vae"), "--decode-batch-size", "2"])
    got = load_npz(out)
    assert got["arr_0"].shape == (5, 16, 16, 3) and got["arr_0"].dtype == np.uint8

    model, cfg = load_model(ckpt)
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    z = torch.cat([generation.IndexSampler(model, cfg).sample(r, pad_to=4)[0] for r in (range(4), range(4, 5))])
    with torch.no_grad():
        want = to_uint8(torch.cat([vae.decode(c / 0.18215).sample for c in z.split(2)]))
    assert np.array_equal(got["arr_0"], want)
    assert got["arr_0"].std() > 5  # the decoder's output, not a constant image


# -- the digits study -----------------------------------------------------------------------------------------


def test_study_digits_smoke(tmp_path):
    from dfm.launch.experiments.study_digits import main as study_main
    from dfm.launch.experiments.study_digits import split_nfe

    assert split_nfe([40, 10], 50) == [40, 10] and split_nfe([40, 10], 5) == [4, 1] and split_nfe([50], 7) == [7]
    assert split_nfe([1, 1, 8], 4) == [1, 1, 2]
    argv = ["--out", str(tmp_path / "study"), "--steps", "4", "--every", "2", "--samples", "16", "--nfe", "5",
            "--batch-size", "8", "--cache-dir", str(tmp_path / "cache"), "--seeds", "0,1",
            "arch.depth=2", "arch.hidden_size=64", "arch.num_heads=2", "train.global_batch_size=8",
            "sample.per_class=1"]  # fmt: skip
    study = study_main(argv)
    assert sorted(study["runs"]) == ["dfm-seed0", "dfm-seed1", "sit-seed0", "sit-seed1"]
    for run in study["runs"].values():
        assert sorted(run["evals"], key=int) == ["2", "4"]
        for scores in run["evals"].values():  # 2 and 4 steps of training: far below the real digits' scores
            assert scores["fd"] > study["real"]["fd"] and scores["accuracy"] < study["real"]["accuracy"]
            assert scores["fine_band_ratio"] > 0
    # the seeds are different runs: other initial weights, other samples
    assert study["runs"]["dfm-seed0"]["evals"]["4"]["fd"] != study["runs"]["dfm-seed1"]["evals"]["4"]["fd"]
    assert study["runs"]["dfm-seed0"]["evals"]["4"]["steps_per_stage"] == [4, 1]
    assert study["runs"]["sit-seed1"]["evals"]["4"]["steps_per_stage"] == [5]
    assert study["real"]["accuracy"] > 0.9 and study["real"]["fine_band_ratio"] == pytest.approx(1.0, abs=0.1)
    from dfm.launch.experiments.study_digits import crossing

    assert crossing([1, 2, 3], {1: 8.0, 2: 4.0, 3: 1.0}, 2.0) == pytest.approx(2.5)  # log-linear: 4 -> 1 halfway at 2
    assert crossing([1, 2], {1: 8.0, 2: 4.0}, 8.0) == 1 and crossing([1, 2], {1: 8.0, 2: 4.0}, 3.0) is None
    ratio = study["step_ratio"]
    assert ratio["final_step"] == 4 and set(ratio["per_seed"]) == {"0", "1"}
    table = (tmp_path / "study" / "study.md").read_text()
    fds = [study["runs"][f"dfm-seed{s}"]["evals"]["4"]["fd"] for s in (0, 1)]
    mean, std = sum(fds) / 2, abs(fds[0] - fds[1]) / 2**0.5  # the sample standard deviation of two values
    assert f"| 4 | 32 | {mean:.2f} ± {std:.2f} |" in table and "real digits" in table
    png = tmp_path / "study" / "study.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # a second call reuses every run and every evaluation
    again = study_main(argv)
    assert again["runs"] == study["runs"]
