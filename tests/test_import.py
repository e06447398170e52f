"""``dfm import`` and ``dfm.load_pretrained``.

Checkpoint files are written in each foreign layout from our own (tiny, randomised) model's weights under
the other code's keys -- renamed here by rules written independently of ``dfm.importer`` -- then imported
through the command; the imported directory must give back bitwise the same weights and outputs, sample,
export and fine-tune. Unmappable and malicious files must be refused before anything is written.
"""

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dfm.launch import import_checkpoint

from dfm import checkpoint, load_pretrained
from dfm.config import ConfigError
from dfm.models import DFMSiT, build_model
from dfm.pretrained import pretrained_config

TINY = dict(depth=2, hidden_size=64, num_heads=2, input_size=8, in_channels=4)  # 8x8x4 latents: 64 px images
TINY_FLAGS = ["--num-heads", "2"]  # depth 2 / width 64 is no registered size: heads are not in the weights


def tiny_model(stages: int, num_classes: int = 10, seed: int = 0, qk_norm: bool = False) -> DFMSiT:
    name = "DFM-SiT-S/2" if stages > 1 else "SiT-S/2"
    model = build_model(name, num_classes=num_classes, stages=stages, qk_norm=qk_norm, **TINY)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random everywhere: the zero-initialised heads would make output checks vacuous
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


# their keys, per the layouts the issue lists (the authors' DFM-SiT; SiT / REPA / the SiT release)
RENAMES = {
    "dfm": [
        (r"^x_embedders\.(\d+)\.", r"x_embedder.embedders.\1."),
        (r"^t_embedders\.(\d+)\.", r"t_embedder.embedders.\1."),
        (r"^final_layers\.(\d+)\.", r"final_layer.projections.\1."),
    ],
    "sit": [
        (r"^x_embedders\.0\.", "x_embedder."),
        (r"^t_embedders\.0\.", "t_embedder."),
        (r"^final_layers\.0\.", "final_layer."),
    ],
}


def their_state(model: DFMSiT, family: str) -> dict:
    out = {}
    for key, value in model.state_dict().items():
        for pattern, repl in RENAMES[family] + [(r"^y_embedder\.table\.", "y_embedder.embedding_table.")]:
            key = re.sub(pattern, repl, key)
        out[key] = value.clone()
    out["pos_embed"] = model.pos_embed.clone()  # a frozen parameter in their models
    assert not any(k.startswith(("x_embedders", "t_embedders", "final_layers", "y_embedder.table")) for k in out)
    return out


def repa_projectors(hidden: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    dims = [(hidden, 32), (32, 32), (32, 16)]  # REPA's build_mlp: Linear, SiLU, Linear, SiLU, Linear
    out = {}
    for i, (a, b) in zip((0, 2, 4), dims):
        out[f"projectors.0.{i}.weight"] = torch.randn(b, a, generator=g)
        out[f"projectors.0.{i}.bias"] = torch.randn(b, generator=g)
    return out


def dfm_args(**extra) -> argparse.Namespace:
    values = dict(model="DFM-SiT-S/2", resolution=64, num_classes=10, stages_count=2, stage_weights=[0.8, 0.2],
                  num_steps_per_scale=[3, 2], stage_sampling_thresholds=[0.2], cfg_prob=0.1, enc_type="dinov2-vit-b",
                  qk_norm=False, path_type="linear", prediction="v", batch_size=256)  # fmt: skip
    return argparse.Namespace(**(values | extra))


def save_training_ckpt(path: Path, ema: dict, raw: dict, args: argparse.Namespace) -> Path:
    """The authors' (REPA's) train.py layout."""
    opt = {"state": {0: {"step": torch.tensor(400.0), "exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]}
    torch.save({"model": raw, "ema": ema, "opt": opt, "args": args, "steps": 400}, path)
    return path


def run_import(src: Path, out: Path, *flags: str) -> Path:
    return import_checkpoint.main([str(src), "--out", str(out), *flags])


def refused(src: Path, out: Path, *flags: str) -> str:
    with pytest.raises(SystemExit) as err:
        run_import(src, out, *flags)
    message = str(err.value.code)
    assert message.startswith("dfm import: ") and "\n" not in message
    return message


def inputs(model: DFMSiT, seed: int = 3, batch: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(batch, *shape, generator=g) for shape in model.input_shapes()]
    t = torch.rand(batch, model.stages, generator=g)
    y = torch.randint(0, model.config.num_classes, (batch,), generator=g)
    mask = torch.ones(batch, model.stages, dtype=torch.bool)
    mask[0, 1:] = False  # one sample with its later stages masked
    return x, t, y, mask


def assert_bitwise_same(a: DFMSiT, b: DFMSiT) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    with torch.no_grad():
        for va, vb in zip(a(*inputs(a)), b(*inputs(b))):
            assert torch.equal(va, vb)


# -- the layouts import bitwise -------------------------------------------------------------------------------


def ema_drifted(pos: torch.Tensor, steps: int = 2000, decay: float = 0.9999) -> torch.Tensor:
    """``pos`` after REPA's EMA update, which also averages this frozen parameter: rounding drift only."""
    ema = pos.clone()
    for _ in range(steps):
        ema.mul_(decay).add_(pos, alpha=1 - decay)
    return ema


@pytest.mark.parametrize("layout", ["dfm-sit", "dfm-sit-qk-norm", "authors-sit", "repa"])
def test_training_checkpoints_import_bitwise(tmp_path, layout, capsys):
    qk_norm = layout.endswith("qk-norm")  # timm's Attention(qk_norm=True): blocks.N.attn.{q,k}_norm, as ours
    layout = layout.removesuffix("-qk-norm")
    stages = 2 if layout == "dfm-sit" else 1
    family = "dfm" if stages == 2 else "sit"
    ema, raw = tiny_model(stages, seed=0, qk_norm=qk_norm), tiny_model(stages, seed=1, qk_norm=qk_norm)
    their_ema, their_raw = their_state(ema, family), their_state(raw, family)
    their_ema["pos_embed"] = ema_drifted(their_ema["pos_embed"])
    assert not torch.equal(their_ema["pos_embed"], their_raw["pos_embed"])
    if layout == "dfm-sit":
        args, name = dfm_args(qk_norm=qk_norm), "DFM-SiT-S/2"
    elif layout == "authors-sit":  # the same script: it keeps the DFM schedule defaults for SiT runs
        args, name = dfm_args(model="SiT-S/2", stages_count=1, stage_weights=[0.9, 0.1]), "SiT-S/2"
        args.num_steps_per_scale, args.stage_sampling_thresholds = [40, 10], [0.1]
    else:
        args, name = argparse.Namespace(model="SiT-S/2", resolution=64, num_classes=10, enc_type="dinov2-vit-b",
                                        proj_coeff=0.5, encoder_depth=1, cfg_prob=0.1, path_type="linear",
                                        prediction="v", qk_norm=False), "SiT-S/2"  # fmt: skip
        their_ema |= repa_projectors(64, seed=5)
        their_raw |= repa_projectors(64, seed=6)
    src = save_training_ckpt(tmp_path / "0000400.pt", their_ema, their_raw, args)

    run_import(src, tmp_path / "ema", "--model", name, *TINY_FLAGS)  # the EMA by default, as their sampler
    assert "(the rounding drift of an EMA that also averaged it; ours is exact)" in capsys.readouterr().out
    run_import(src, tmp_path / "raw", "--model", name, "--weights", "model", *TINY_FLAGS)
    assert_bitwise_same(load_pretrained(tmp_path / "ema"), ema)
    assert_bitwise_same(load_pretrained(tmp_path / "raw"), raw)
    assert sorted(p.name for p in (tmp_path / "ema").iterdir()) == ["config.yaml", "ema.safetensors"]

    cfg = pretrained_config(tmp_path / "ema")
    assert (cfg.model, cfg.stages, cfg.arch.depth, cfg.arch.hidden_size, cfg.arch.num_heads) == (name, stages, 2, 64, 2)
    assert (cfg.data.kind, cfg.data.resolution, cfg.data.channels, cfg.data.num_classes) == ("latents", 8, 4, 10)
    assert cfg.arch.qk_norm is (True if qk_norm else None)  # written only where it differs from the registry
    assert cfg.data.data_dir is None and cfg.dfm.class_dropout == 0.1
    if layout == "dfm-sit":  # their sampling arguments are the imported config's defaults
        assert cfg.steps_per_stage() == [3, 2] and cfg.thresholds() == [0.2] and cfg.dfm.stage_weights == [0.8, 0.2]
    else:  # the 2-stage defaults do not fit a SiT: ours apply
        assert cfg.steps_per_stage() == [50] and cfg.thresholds() == [] and cfg.dfm.stage_weights is None


def sinusoid_reversal(frequency_size: int = 256) -> torch.Tensor:
    """M with ``sinusoid(1 - t) = M @ sinusoid(t)`` for DiT's [cos | sin] features (float64; M @ M = I)."""
    half = frequency_size // 2
    f = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half).double()
    i = torch.arange(half)
    m = torch.zeros(frequency_size, frequency_size, dtype=torch.float64)
    m[i, i], m[i, half + i] = torch.cos(f), torch.sin(f)
    m[half + i, i], m[half + i, half + i] = torch.sin(f), -torch.cos(f)
    return m


def sit_release_state(model: DFMSiT, seed: int = 9) -> dict:
    """Our single-stage weights as the original SiT code holds them: t = 1 at the data and v = x - eps (first
    timestep layer composed with the reversal, head negated), and learn_sigma (2C outputs per pixel, laid out
    (p, p, 2C) with the unused C random)."""
    sd = their_state(model, "sit")
    w = sd["t_embedder.mlp.0.weight"]
    sd["t_embedder.mlp.0.weight"] = (w.double() @ sinusoid_reversal(w.shape[1])).float()
    p, C = model.config.patch_size, model.config.in_channels
    g = torch.Generator().manual_seed(seed)
    for kind in ("weight", "bias"):
        head = -sd[f"final_layer.linear.{kind}"]
        rest = head.shape[1:]
        sigma = torch.randn(p, p, C, *rest, generator=g)
        sd[f"final_layer.linear.{kind}"] = torch.cat([head.view(p, p, C, *rest), sigma], dim=2).reshape(-1, *rest)
    return sd


def test_original_sit_release_is_time_reversed_and_learn_sigma(tmp_path):
    ours = tiny_model(1)
    theirs = sit_release_state(ours)
    torch.save(theirs, tmp_path / "SiT-XL-2-256x256.pt")  # a bare state dict, no args
    with torch.no_grad():  # the file holds another function of t: importing it by renaming alone would be wrong
        assert not torch.allclose(theirs["t_embedder.mlp.0.weight"], ours.t_embedders[0].mlp[0].weight, atol=1e-3)
    run_import(
        tmp_path / "SiT-XL-2-256x256.pt", tmp_path / "sit", "--model", "SiT-S/2", "--num-classes", "10", *TINY_FLAGS
    )
    imported = load_pretrained(tmp_path / "sit")

    a, b = imported.state_dict(), ours.state_dict()
    assert a.keys() == b.keys()
    for k in a:  # renamed and sliced tensors exactly; the folded rotation to float64-then-fp32 rounding
        if k == "t_embedders.0.mlp.0.weight":
            assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), (a[k] - b[k]).abs().max()
        else:
            assert torch.equal(a[k], b[k]), k

    # independently of how the file was made: v_ours(x, t) = -v_sit(x, 1 - t), with their head's used channels
    stand_in = build_model("SiT-S/2", num_classes=10, **TINY)
    p, C = 2, 4
    sd = {k: v for k, v in theirs.items() if k != "pos_embed"}
    for kind in ("weight", "bias"):
        head = sd.pop(f"final_layer.linear.{kind}")
        sd[f"final_layers.0.linear.{kind}"] = head.view(p, p, 2 * C, *head.shape[1:])[:, :, :C].reshape(
            -1, *head.shape[1:]
        )
    sd = {
        re.sub(r"^x_embedder\.", "x_embedders.0.", re.sub(r"^t_embedder\.", "t_embedders.0.", k)): v
        for k, v in sd.items()
    }
    sd = {re.sub(r"^final_layer\.", "final_layers.0.", k.replace("embedding_table", "table")): v for k, v in sd.items()}
    stand_in.load_state_dict(sd)
    x, t, y, mask = inputs(imported)
    with torch.no_grad():
        v = imported(x, t, y, mask)[0]
        v_sit = stand_in(x, 1 - t, y, mask)[0]
        assert torch.allclose(v, -v_sit, rtol=1e-4, atol=1e-4)
        assert torch.allclose(v, ours(x, t, y, mask)[0], rtol=1e-5, atol=1e-5)
        assert v.abs().mean() > 0.1  # a real signal, not zeros
    cfg = pretrained_config(tmp_path / "sit")
    assert cfg.dfm.class_dropout == 0.1 and cfg.data.resolution == 8  # 11 rows = 10 classes + null; pos_embed's grid


@pytest.mark.parametrize("rows", [1000, 1001])
def test_label_table_with_and_without_the_null_row(tmp_path, rows):
    ours = tiny_model(2, num_classes=1000)
    theirs = their_state(ours, "dfm")
    theirs["y_embedder.embedding_table.weight"] = theirs["y_embedder.embedding_table.weight"][:rows]
    args = dfm_args(num_classes=1000, cfg_prob=0.1 if rows == 1001 else 0.0)
    src = save_training_ckpt(tmp_path / "c.pt", theirs, theirs, args)
    run_import(src, tmp_path / "out", "--model", "DFM-SiT-S/2", *TINY_FLAGS)
    imported = load_pretrained(tmp_path / "out")
    table = imported.y_embedder.table.weight
    assert table.shape == (1001, 64) and torch.equal(table[:1000], ours.y_embedder.table.weight[:1000])
    x, t, y, mask = inputs(imported)  # labels < 1000: the same function whatever the null row
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(imported(x, t, y, mask), ours(x, t, y, mask)))
    if rows == 1001:
        assert_bitwise_same(imported, ours)
        assert pretrained_config(tmp_path / "out", overrides=["sample.cfg_scale=2.0"]).sample.cfg_scale == 2.0
    else:  # trained without CFG: the appended row is for fine-tuning only, and guidance is refused
        assert torch.equal(table[1000], ours.y_embedder.table.weight[:1000].mean(dim=0))
        assert pretrained_config(tmp_path / "out").dfm.class_dropout == 0.0
        with pytest.raises(ConfigError, match=r"'sample.cfg_scale' is 2.0 but 'dfm.class_dropout' is 0"):
            pretrained_config(tmp_path / "out", overrides=["sample.cfg_scale=2.0"])
        from dfm.launch import sample

        with pytest.raises(SystemExit, match="class_dropout"):
            sample.main(["--ckpt", str(tmp_path / "out"), "--out", str(tmp_path / "g.png"), "sample.cfg_scale=2.0"])


# -- the commands on an imported directory ---------------------------------------------------------------------


def clean_env() -> dict:
    """One thread (the in-process reference is computed with one) and no rendezvous variables of in-process runs."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {k: v for k, v in os.environ.items() if k not in drop} | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def test_cli_import_then_sample_gives_the_source_models_images(tmp_path):
    from dfm.visualize import class_rows, sample_model, to_uint8

    ours = tiny_model(2)
    src = save_training_ckpt(tmp_path / "c.pt", their_state(ours, "dfm"), their_state(ours, "dfm"), dfm_args())
    dfm = [sys.executable, "-m", "dfm.launch.cli"]
    out = tmp_path / "imported"
    res = subprocess.run([*dfm, "import", str(src), "--out", str(out), "--model", "DFM-SiT-S/2", *TINY_FLAGS],
                         capture_output=True, text=True, env=clean_env(), timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "DFM-SiT-S/2, 2 stage(s), 4x8x8 latents, 10 classes, CFG available" in res.stdout
    res = subprocess.run([*dfm, "sample", "--ckpt", str(out), "--npz", str(tmp_path / "s.npz"), "--per-class", "2"],
                         capture_output=True, text=True, env=clean_env(), timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "samples.png").is_file()
    got = np.load(tmp_path / "s.npz")["arr_0"]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = pretrained_config(out)
        y = class_rows(10, 2, "cpu")
        want = to_uint8(sample_model(ours, cfg, y, generator=torch.Generator("cpu").manual_seed(0)).x)
    finally:
        torch.set_num_threads(threads)
    assert got.shape == (20, 8, 8, 3) and np.array_equal(got, want) and got.std() > 1


def test_load_pretrained_reads_every_source_alike(tmp_path):
    from dfm.launch.export import export

    ours = tiny_model(2)
    src = save_training_ckpt(tmp_path / "c.pt", their_state(ours, "dfm"), their_state(ours, "dfm"), dfm_args())
    imported = run_import(src, tmp_path / "imported", "--model", "DFM-SiT-S/2", *TINY_FLAGS)
    ckpt = tmp_path / "runs" / "r" / "checkpoints" / "0000007"  # a run's checkpoint layout, weights-only
    shutil.copytree(imported, ckpt)
    checkpoint.write_manifest(ckpt, 7, "run", {"world_size": 1, "zero_stage": 0})  # what a save writes last
    (ckpt.parent / "latest").write_text("0000007")
    exported = export(imported, tmp_path / "w.safetensors")
    for path in (imported, ckpt, tmp_path / "runs" / "r", exported):
        model = load_pretrained(path)
        assert not model.training
        assert_bitwise_same(model, ours)
    exported.with_suffix(".yaml").unlink()  # the config also travels in the exported file's metadata
    assert_bitwise_same(load_pretrained(exported), ours)


def test_finetune_from_an_imported_directory(tmp_path):
    from dfm.launch import train

    from dfm.data.store import write_store

    ours = tiny_model(2)
    src = save_training_ckpt(tmp_path / "c.pt", their_state(ours, "dfm"), their_state(ours, "dfm"), dfm_args())
    imported = run_import(src, tmp_path / "imported", "--model", "DFM-SiT-S/2", *TINY_FLAGS)
    g = np.random.default_rng(0)
    moments = np.concatenate([g.normal(size=(16, 4, 8, 8)), np.full((16, 4, 8, 8), 0.1)], axis=1).astype(np.float32)
    store = write_store(tmp_path / "store", moments, np.arange(16) % 10, num_classes=10)
    flags = ["--ckpt", str(imported), "--exp-name", "ft", f"output_dir={tmp_path}", "train.max_steps=2",
             "train.global_batch_size=4", "train.log_every=1", "train.ckpt_every=2", "data.loader=torch",
             "data.num_workers=0", "sample.per_class=1"]  # fmt: skip
    with pytest.raises(SystemExit, match=r"'data.data_dir' is required"):  # the store, checked before any work
        train.main(flags)
    assert not (tmp_path / "ft").exists()

    train.main(flags + ["--data-dir", str(store)])
    ckpt = tmp_path / "ft" / "checkpoints" / "0000002"

    ema, raw, init = checkpoint.load_ema_weights(ckpt), checkpoint.load_model_weights(ckpt), ours.state_dict()
    # two AdamW steps of lr 1e-4 from the imported weights (a fresh init differs by ~0.2 everywhere)
    assert max((raw[k].float() - init[k]).abs().max().item() for k in init) < 1e-3
    assert any(not torch.equal(raw[k].float(), init[k]) for k in init)
    assert max((ema[k] - init[k]).abs().max().item() for k in init) < 1e-6
    with pytest.raises(SystemExit, match="already has checkpoints"):
        train.main(flags + ["--data-dir", str(store)])


# -- refusals ---------------------------------------------------------------------------------------------------


class WritesMarker:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('executed')",))


def test_malicious_pickle_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    theirs = their_state(tiny_model(2), "dfm")
    torch.save({"ema": theirs, "model": theirs, "args": WritesMarker(marker), "steps": 1}, tmp_path / "evil.pt")
    message = refused(tmp_path / "evil.pt", tmp_path / "out", *TINY_FLAGS)
    assert str(tmp_path / "evil.pt") in message and "builtins.exec" in message
    assert not marker.exists() and not (tmp_path / "out").exists()


def _drop(sd):
    del sd["blocks.1.mlp.fc2.weight"]


def _reshape(sd):
    sd["blocks.0.attn.proj.weight"] = sd["blocks.0.attn.proj.weight"][:, :32]


def _qk_norm(sd):
    sd["blocks.0.attn.q_norm.weight"], sd["blocks.0.attn.k_norm.weight"] = torch.ones(32), torch.ones(32)


def _extra(sd):
    sd["decoder.head.weight"] = torch.zeros(3)


def _pos_embed(sd):  # rows and columns swapped: same values, another layout
    sd["pos_embed"] = sd["pos_embed"].view(1, 4, 4, 64).transpose(1, 2).reshape(1, 16, 64)


def _finest_first(sd):
    for kind in ("weight", "bias"):
        a, b = f"x_embedder.embedders.0.proj.{kind}", f"x_embedder.embedders.1.proj.{kind}"
        sd[a], sd[b] = sd[b], sd[a]


@pytest.mark.parametrize(
    "damage, needle",
    [
        (_drop, "missing keys blocks.1.mlp.fc2.weight"),
        (_reshape, "wrong shapes blocks.0.attn.proj.weight (64, 32) (model: (64, 64))"),
        (_qk_norm, "args.qk_norm is False but the weights have q/k norms"),
        (_extra, "keys with no counterpart in our model: decoder.head.weight"),
        (_pos_embed, "pos_embed differs from the fixed 2-D sin-cos embedding"),
        (_finest_first, "stage 0 patch embedding has shape (64, 4, 2, 2)"),
    ],
    ids=["missing", "shape", "qk-norm", "unknown", "pos_embed", "stage-order"],
)
def test_unmappable_files_are_refused_before_writing(tmp_path, damage, needle):
    theirs = their_state(tiny_model(2), "dfm")
    theirs = dict(sorted(theirs.items()))
    damage(theirs)
    src = save_training_ckpt(tmp_path / "c.pt", theirs, theirs, dfm_args())
    message = refused(src, tmp_path / "out", "--model", "DFM-SiT-S/2", *TINY_FLAGS)
    assert needle in message and str(src) in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]  # no output, no staging debris


def test_sizes_and_targets_that_disagree_are_refused(tmp_path):
    theirs = their_state(tiny_model(2), "dfm")
    src = save_training_ckpt(tmp_path / "c.pt", theirs, theirs, dfm_args())
    out = tmp_path / "out"
    assert "args.model DFM-SiT-S/2 has depth 12 / hidden 384 but the weights have 2 / 64" in refused(src, out)
    assert "pass --num-heads" in refused(src, out, "--model", "DFM-SiT-S/2")
    assert "--resolution -> 16x16 latents, args.resolution -> 8x8 latents" in refused(
        src, out, "--model", "DFM-SiT-S/2", "--resolution", "128", *TINY_FLAGS
    )
    cosine = save_training_ckpt(tmp_path / "cos.pt", theirs, theirs, dfm_args(path_type="cosine"))
    assert "args.path_type is 'cosine'" in refused(cosine, out, "--model", "DFM-SiT-S/2", *TINY_FLAGS)
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "already exists and is not empty" in refused(src, out, "--model", "DFM-SiT-S/2", *TINY_FLAGS)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
