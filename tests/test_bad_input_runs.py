"""Bad input to the commands that read or write runs, checkpoints and model files (``dfm train``, ``sample``,
``generate``, ``export``, ``import``), as a new user would give it: each case must exit with the expected
code, say in one line what is wrong naming the argument or file, and leave every file and folder under the
test's root byte for byte as it was (a refused command touches nothing: no cleared run, no empty folder,
no half-written output, no temporary file).

The fixtures are built once: a finished 2-step digits run of a tiny model (real DeepSpeed engine, CPU), a
copy of it whose EMA weights were altered in place, an export of it, an exported file holding a NaN, the
samples ``dfm generate`` made from it, and foreign training checkpoints with a NaN or one misshapen tensor.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dfm.launch import cli
from safetensors.torch import load_file, save_file
from test_import import TINY_FLAGS, dfm_args, save_training_ckpt, their_state, tiny_model
from test_rundir import TINY, snapshot

from dfm import checkpoint

ROOT = Path(__file__).resolve().parent.parent
DIGITS = str(ROOT / "configs" / "dfm_digits.yaml")
HAS_CUDA = torch.cuda.is_available()


def dfm(argv: list[str], capsys) -> tuple[int, str]:
    """``dfm argv`` in this process: (exit code, stderr). A ``sys.exit("message")`` is exit 1 with the message."""
    capsys.readouterr()
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
        if isinstance(code, str):
            print(code, file=sys.stderr)
            code = 1
    return code or 0, capsys.readouterr().err


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from dfm.launch.train import run
    from test_rundir import tiny

    root = tmp_path_factory.mktemp("bad")
    run(tiny(root, "exp_name=done", "train.eval_every=0"))  # no 500-sample evaluation at the end
    ckpt = root / "done" / "checkpoints" / "0000002"
    shutil.copytree(root / "done", root / "altered")
    shutil.copytree(root / "done", root / "twin")
    ema = root / "altered" / "checkpoints" / "0000002" / checkpoint.EMA_FILE
    data = bytearray(ema.read_bytes())
    data[-5] ^= 0x40  # a flipped bit in the last weight: same size, another checksum
    ema.write_bytes(bytes(data))
    shutil.copytree(ckpt, root / "unlisted" / "0000002")
    (root / "unlisted" / "0000002" / checkpoint.MANIFEST).unlink()  # what an interrupted copy would leave

    assert cli.main(["export", "--ckpt", str(ckpt), "--out", str(root / "exp" / "w.safetensors")]) == 0
    weights = load_file(str(root / "exp" / "w.safetensors"))
    weights["y_embedder.table.weight"][0, 0] = float("nan")
    (root / "nan").mkdir()
    save_file(weights, str(root / "nan" / "w.safetensors"))
    shutil.copy(root / "exp" / "w.yaml", root / "nan" / "w.yaml")

    (root / "unrelated.yaml").write_text("a file of the user's, not a config of ours\n")
    (root / "taken.safetensors").write_bytes(b"someone else's weights")
    (root / "exp.safetensors").mkdir()

    gen = ["generate", "--ckpt", root / "done", "--num-samples", "2", "--batch-size", "2", "--device", "cpu"]
    assert cli.main([str(a) for a in [*gen, "--out", root / "s.npz"]]) == 0

    theirs = their_state(tiny_model(2), "dfm")
    nan = {k: v.clone() for k, v in theirs.items()}
    nan["blocks.1.attn.qkv.weight"][3, 3] = float("nan")
    save_training_ckpt(root / "nan.pt", nan, nan, dfm_args())
    bent = dict(theirs)
    bent["blocks.0.mlp.fc1.weight"] = bent["blocks.0.mlp.fc1.weight"][:128]  # width 256 -> 128 in one block
    save_training_ckpt(root / "bent.pt", bent, bent, dfm_args())
    save_training_ckpt(root / "good.pt", theirs, theirs, dfm_args())
    return root


def train(*args: str) -> list[str]:
    return ["train", "--config", DIGITS, *TINY, *args]


# (id, argv with {root} filled in, exit code, what the one line must say (a regex, {root} filled in))
CASES = [
    # a refused start touches nothing: the finished run stays whole, no new folder appears
    ("overwrite-bad-batch", train("output_dir={root}", "exp_name=done", "--overwrite", "train.micro_batch_size=7"),
     1, r"train\.global_batch_size.* \(8\) is not a multiple of micro batch \(7\)"),
    ("new-run-bad-batch", train("output_dir={root}", "exp_name=new", "train.micro_batch_size=3"),
     1, r"train\.global_batch_size"),
    ("resume-misspelled", train("output_dir={root}", "exp_name=dnoe", "--resume"),
     1, r"--resume: nothing to resume in {root}/dnoe"),
    ("ckpt-missing", train("output_dir={root}", "exp_name=done", "--ckpt", "{root}/nonexistent"),
     1, r"{root}/nonexistent does not exist"),
    ("foreign-ckpt-into-a-run",
     train("output_dir={root}", "exp_name=twin", "--ckpt", "{root}/done/checkpoints/0000002"),
     1, r"--ckpt {root}/done/checkpoints/0000002 is not a checkpoint of {root}/twin, which already holds a run"),
    ("fresh-in-used-folder", train("output_dir={root}", "exp_name=done"),
     1, r"{root}/done already holds a run"),
    # sampling: arguments checked before anything is loaded
    ("sample-device-banana", ["sample", "--ckpt", "{root}/done", "--device", "banana"],
     2, r"argument --device: expected auto, cpu, cuda or cuda:N, got 'banana'"),
    ("sample-per-class-negative", ["sample", "--ckpt", "{root}/done", "--per-class", "-3"],
     2, r"argument --per-class: expected an integer >= 1, got -3"),
    ("sample-per-class-zero", ["sample", "--ckpt", "{root}/done", "--per-class", "0"],
     2, r"argument --per-class: expected an integer >= 1, got 0"),
    ("sample-model-key", ["sample", "--ckpt", "{root}/done", "arch.depth=4"],
     1, r"'arch\.depth' cannot be overridden when sampling a checkpoint: only the sampling keys"),
    ("generate-model-key", ["generate", "--ckpt", "{root}/done", "--out", "{root}/g.npz", "data.resolution=8"],
     1, r"'data\.resolution' cannot be overridden"),
    ("generate-device-banana", ["generate", "--ckpt", "{root}/done", "--out", "{root}/g.npz", "--device", "banana"],
     2, r"argument --device: invalid choice: 'banana'"),
    ("sample-out-existing", ["sample", "--ckpt", "{root}/done", "--out", "{root}/taken.safetensors"],
     1, r"--out {root}/taken\.safetensors already exists; pass --force to replace it"),
    ("sample-npz-existing", ["sample", "--ckpt", "{root}/done", "--npz", "{root}/s.npz"],
     1, r"--npz {root}/s\.npz already exists; pass --force to replace it"),
    # every reader of a checkpoint verifies it as --resume does, and refuses non-finite weights
    ("sample-altered", ["sample", "--ckpt", "{root}/altered", "--device", "cpu"],
     1, r"{root}/altered/checkpoints/0000002/ema\.safetensors does not match its checksum"),
    ("generate-altered", ["generate", "--ckpt", "{root}/altered", "--out", "{root}/g.npz", "--device", "cpu"],
     1, r"{root}/altered/checkpoints/0000002/ema\.safetensors does not match its checksum"),
    ("export-altered", ["export", "--ckpt", "{root}/altered", "--out", "{root}/e.safetensors"],
     1, r"{root}/altered/checkpoints/0000002/ema\.safetensors does not match its checksum"),
    ("sample-no-manifest", ["sample", "--ckpt", "{root}/unlisted/0000002", "--device", "cpu"],
     1, r"{root}/unlisted/0000002/manifest\.json is missing"),
    ("sample-nan", ["sample", "--ckpt", "{root}/nan/w.safetensors", "--device", "cpu"],
     1, r"{root}/nan/w\.safetensors: non-finite weights \(NaN or inf\) in y_embedder\.table\.weight$"),
    ("generate-nan", ["generate", "--ckpt", "{root}/nan/w.safetensors", "--out", "{root}/g.npz", "--device", "cpu"],
     1, r"{root}/nan/w\.safetensors: non-finite weights \(NaN or inf\) in y_embedder\.table\.weight$"),
    ("finetune-rope-on-sincos", train("output_dir={root}", "exp_name=ft", "--ckpt", "{root}/exp/w.safetensors",
                                      "arch.pos_embed=rope"),
     1, r"cannot fine-tune {root}/exp/w\.safetensors into another architecture \(pos_embed: 'sincos' -> 'rope'\)"),
    ("finetune-nan", train("output_dir={root}", "exp_name=ft", "--ckpt", "{root}/nan/w.safetensors"),
     1, r"{root}/nan/w\.safetensors: non-finite weights"),
    # generate: an existing .npz made otherwise is not called done
    ("generate-other-settings", ["generate", "--ckpt", "{root}/done", "--out", "{root}/s.npz", "--num-samples", "2",
                                 "--batch-size", "2", "--device", "cpu", "--seed", "1"],
     1, r"--out {root}/s\.npz already exists, made with other settings \(seed: 0 -> 1\); pass --force"),
    # export: never over a file it did not create, nor into the checkpoint it reads
    ("export-config-beside", ["export", "--ckpt", "{root}/done", "--out", "{root}/unrelated.safetensors"],
     1, r"{root}/unrelated\.yaml \(written beside --out {root}/unrelated\.safetensors\) already exists; pass --force"),
    ("export-existing", ["export", "--ckpt", "{root}/done", "--out", "{root}/taken.safetensors"],
     1, r"--out {root}/taken\.safetensors already exists; pass --force to replace it"),
    ("export-into-checkpoint", ["export", "--ckpt", "{root}/done/checkpoints/0000002",
                                "--out", "{root}/done/checkpoints/0000002/ema.safetensors"],
     1, r"--out {root}/done/checkpoints/0000002/ema\.safetensors is inside the checkpoint"),
    ("export-onto-folder", ["export", "--ckpt", "{root}/done", "--out", "{root}/exp.safetensors/"],
     1, r"--out {root}/exp\.safetensors is a folder"),
    ("export-unwritable", ["export", "--ckpt", "{root}/done", "--out", "/proc/x.safetensors"],
     1, r"--out /proc/x\.safetensors: cannot write in /proc"),
    # import: non-finite weights are never written; one bad tensor is the one named
    ("import-nan", ["import", "{root}/nan.pt", "--out", "{root}/imp", "--model", "DFM-SiT-S/2", *TINY_FLAGS],
     1, r"{root}/nan\.pt: non-finite weights \(NaN or inf\) in blocks\.1\.attn\.qkv\.weight$"),
    ("import-one-bent", ["import", "{root}/bent.pt", "--out", "{root}/imp", "--model", "DFM-SiT-S/2", *TINY_FLAGS],
     1, r"weights do not fit the model: wrong shapes blocks\.0\.mlp\.fc1\.weight \(128, 64\) \(model: \(256, 64\)\)$"),
    ("import-existing-out", ["import", "{root}/good.pt", "--out", "{root}/taken.safetensors", "--model",
                             "DFM-SiT-S/2", *TINY_FLAGS],
     1, r"--out {root}/taken\.safetensors already exists"),
    ("import-unwritable", ["import", "{root}/good.pt", "--out", "/proc/imp", "--model", "DFM-SiT-S/2", *TINY_FLAGS],
     1, r"--out /proc/imp: cannot write in /proc"),
]  # fmt: skip
if not HAS_CUDA:
    CASES += [
        ("generate-cudagraph-on-cpu", ["generate", "--ckpt", "{root}/done", "--out", "{root}/g.npz", "--device", "cpu",
                                       "--sampler", "cudagraph"],
         1, r"--sampler cudagraph: sampler mode 'cudagraph' was forced but the tensors are on cpu, not CUDA"),
        ("sample-device-cuda", ["sample", "--ckpt", "{root}/done", "--device", "cuda"],
         1, r"--device cuda was given but CUDA is not available"),
        ("generate-device-cuda", ["generate", "--ckpt", "{root}/done", "--out", "{root}/g.npz", "--device", "cuda"],
         1, r"--device cuda was given but CUDA is not available"),
    ]  # fmt: skip


@pytest.mark.parametrize("argv, code, says", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(root, capsys, argv, code, says):
    before = snapshot(root)
    got, err = dfm([a.format(root=root) for a in argv], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    if code == 2:  # argparse: its usage block, then the one line naming the argument
        lines = [line for line in lines if line.startswith("dfm ")]
    assert got == code, err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert re.search(says.format(root=re.escape(str(root))), lines[0]), lines[0]
    assert ".tmp" not in lines[0]  # the user's path, never an internal temporary one
    assert snapshot(root) == before


def test_the_same_generate_again_is_done_and_force_makes_it_anew(root, capsys):
    gen = ["generate", "--ckpt", root / "done", "--num-samples", "2", "--batch-size", "2", "--device", "cpu"]
    before = snapshot(root)
    assert dfm([*gen, "--out", root / "s.npz"], capsys)[0] == 0
    assert snapshot(root) == before  # identical settings: nothing to do
    shutil.copy(root / "s.npz", root / "t.npz")
    try:
        assert dfm([*gen, "--out", root / "t.npz", "--seed", "1", "--force"], capsys)[0] == 0
        assert (root / "t.npz").read_bytes() != (root / "s.npz").read_bytes()
    finally:
        (root / "t.npz").unlink()


def test_exported_weights_have_the_mode_of_their_config(root):
    weights, config = root / "exp" / "w.safetensors", root / "exp" / "w.yaml"
    umask = os.umask(0)
    os.umask(umask)
    assert weights.stat().st_mode & 0o777 == config.stat().st_mode & 0o777 == 0o666 & ~umask
    ema = root / "done" / "checkpoints" / "0000002" / checkpoint.EMA_FILE
    assert ema.stat().st_mode & 0o777 == 0o666 & ~umask


def test_ctrl_c_during_training_is_one_line_exit_130_and_loses_no_checkpoint(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [
        sys.executable,
        "-m",
        "dfm.launch.cli",
        *train(f"output_dir={tmp_path}", "exp_name=c", "train.max_steps=100000", "train.eval_every=0"),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    saved = tmp_path / "c" / "checkpoints" / checkpoint.LATEST  # the pointer, written once the first save is whole
    deadline = time.monotonic() + 240
    while not saved.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("dfm train:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert re.fullmatch(
        r"dfm train: interrupted at step \d+ \(latest checkpoint: step \d+\); resume with --resume", lines[0]
    )
    assert checkpoint.find_resumable(tmp_path / "c" / "checkpoints") is not None  # verified, checksums and all
    assert (tmp_path / "c" / ".lock").read_bytes() == b""  # released


def test_an_overwrite_that_fails_once_the_folder_is_locked_keeps_the_old_run(root, monkeypatch):
    """Past the checks, the engine build can still fail (out of memory, a DeepSpeed error): the old run is
    cleared only after it, so it stays whole."""
    import dfm.launch.engine
    from dfm.launch.train import run
    from test_rundir import tiny

    def fails(*args, **kwargs):
        raise RuntimeError("the engine could not be built")

    monkeypatch.setattr(dfm.launch.engine, "build_engine", fails)
    before = snapshot(root)
    with pytest.raises(RuntimeError, match="the engine could not be built"):
        run(tiny(root, "exp_name=done", "train.eval_every=0"), overwrite=True)
    with pytest.raises(RuntimeError, match="the engine could not be built"):
        run(tiny(root, "exp_name=brand-new", "train.eval_every=0"))
    assert snapshot(root) == before  # the old run whole, and no folder for the new one
