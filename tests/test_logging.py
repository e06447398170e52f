"""What a run logs: the README's TensorBoard tags, per-stage losses that sum to the loss, the metrics backends,
and a console that is plain lines without DeepSpeed's noise when it is not a terminal."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dfm.config import ConfigError, load_config
from dfm.reporting import Progress, format_line

ROOT = Path(__file__).resolve().parent.parent
TINY = ["arch.depth=2", "arch.hidden_size=64", "arch.num_heads=2", "train.global_batch_size=8",
        "sample.num_steps_per_scale=[2,1]", "sample.per_class=1", "train.sample_every=1000"]  # fmt: skip
LATENT_ONLY = {"eval/fid", "eval/sfid", "eval/inception_score"}  # tests/data/test_latent_run.py sees them
GPU_ONLY = {"train/mfu"}  # a card with a known bf16 peak


def readme_tags(stages: int) -> set[str]:
    """The tags the README's "Logged metrics" table lists, with ``{s}`` expanded to the stages."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Logged metrics", 1)[1].split("\n## ", 1)[0]
    tags = set()
    for tag in re.findall(r"`((?:train|eval)/[a-z_0-9{}]+)`", section):
        tags |= {tag.replace("{s}", str(s)) for s in range(stages)} if "{s}" in tag else {tag}
    return tags


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def tiny(tmp_path, *extra):
    return load_config(ROOT / "configs" / "dfm_digits.yaml", TINY + [f"output_dir={tmp_path}", *extra])


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A digits run of 6 steps logging every 2, evaluated at 3 and 6: its TensorBoard scalars. The main stage
    is drawn per sample with equal weights, so both stages are trained (and logged) in every interval."""
    from dfm.launch.train import run

    out = tmp_path_factory.mktemp("metrics")
    run(tiny(out, "exp_name=tags", "train.max_steps=6", "train.log_every=2", "train.eval_every=3",
             "train.eval_samples=20", "train.lr_warmup_steps=4", "dfm.per_sample_stage=true",
             "dfm.stage_weights=[0.5,0.5]"))  # fmt: skip
    return scalars(out / "tags")


def test_every_readme_tag_is_logged_and_every_logged_tag_is_in_the_readme(logged):
    expected = readme_tags(stages=2)
    assert "train/loss_stage1" in expected and "eval/fd" in expected  # the table was read
    assert set(logged) == expected - LATENT_ONLY - (GPU_ONLY if not torch.cuda.is_available() else set())
    assert sorted(logged["train/loss"]) == [2, 4, 6] and sorted(logged["eval/fd"]) == [3, 6]


def test_stage_losses_sum_to_the_logged_loss(logged):
    for step, loss in logged["train/loss"].items():
        terms = [logged[f"train/loss_stage{s}"][step] for s in range(2)]
        assert sum(terms) == pytest.approx(loss, rel=1e-5), step
        assert terms[1] > 0  # stage 1 was trained in the interval
        # stage 0 is active in every sample, so its MSE is its term; stage 1's term is its MSE x active share
        assert logged["train/mse_stage0"][step] == pytest.approx(terms[0], rel=1e-5)
        assert logged["train/mse_stage1"][step] > 1.2 * terms[1]  # active in about half of the samples


def test_scalars_have_the_values_they_claim(logged):
    assert logged["train/lr"] == pytest.approx({2: 5e-4 * 2 / 4, 4: 5e-4, 6: 5e-4})  # warmup of 4 steps
    assert all(v > 0 for v in logged["train/grad_norm"].values())
    for step in logged["train/loss"]:
        per_image = logged["train/images_per_s"][step] / logged["train/steps_per_s"][step]
        assert per_image == pytest.approx(8, rel=1e-4)  # global batch
    assert 0 <= logged["eval/accuracy"][6] <= 1 and logged["eval/fd"][6] > 0 and logged["eval/seconds"][6] > 0


def test_report_to_none_writes_no_events(tmp_path):
    from dfm.launch.train import run

    run(tiny(tmp_path, "exp_name=quiet", "report_to=none", "train.max_steps=2", "train.log_every=1"))
    assert not (tmp_path / "quiet" / "tb").exists() and (tmp_path / "quiet" / "checkpoints").is_dir()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_without_wandb_is_refused_before_any_work(tmp_path):
    from dfm.launch.train import run

    with pytest.raises(ConfigError, match="'report_to' is wandb but the wandb package is not installed: pip install"):
        run(tiny(tmp_path, "exp_name=wb", "report_to=wandb"))
    assert not (tmp_path / "wb").exists()


def test_console_lines(capsys):
    line = format_line(50, 3000, {"train/loss": 1.0612, "train/lr": 1e-4, "train/steps_per_s": 10.5, "eval/fd": 3.6})
    assert line == "step 50/3000 | loss 1.061 | lr 1.000e-04 | steps/s 10.5 | eval/fd 3.6"
    progress = Progress(10, 0, enabled=True, bar=False)
    progress.update()
    progress.log(line)
    Progress(10, 0, enabled=False).log("not rank 0")
    assert capsys.readouterr() == (line + "\n", "")  # no carriage-return frames, nothing from other ranks


def test_cli_log_is_plain_lines_without_deepspeed_noise(tmp_path):
    """``dfm train > log 2>&1``: the start-up lines, one line per log interval, nothing else (ZeRO 2, where
    DeepSpeed warns about the client optimizer and torch.distributed about deprecated collectives)."""
    from dfm.launch.threads import choose_threads

    unset = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    done = subprocess.run(
        [sys.executable, "-m", "dfm.launch.cli", "train", "--config", str(ROOT / "configs" / "dfm_digits.yaml"),
         "--exp-name", "plain", *TINY, "train.max_steps=4", "train.log_every=2", "train.zero_stage=2",
         f"output_dir={tmp_path}"],
        capture_output=True, text=True, env=env | {"PYTHONUNBUFFERED": "1"}, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert "\r" not in out
    for noise in ("untested optimizer", "FutureWarning", "is deprecated", "built successfully", "[WARNING]"):
        assert noise not in out, (noise, out)
    lines = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    steps = [line for line in lines if "| loss " in line]
    assert [s.split(" |")[0] for s in steps] == ["step 2/4", "step 4/4"]
    (evaluated,) = [line for line in lines if "eval/" in line]  # the digits config evaluates at the last step
    assert evaluated.startswith("step 4/4 | eval/fd ") and "| eval/accuracy " in evaluated
    assert re.search(r"\| loss \d\.\d+ \| loss_stage0 .* \| grad_norm .* \| lr .* \| steps/s ", steps[0])
    start = done.stdout.split("step 2/4")[0]
    threads, why = choose_threads(env={})  # no OMP_NUM_THREADS: the process chooses
    for needle in ("M parameters", "world size 1", "precision fp32", "ZeRO 2", "effective batch 8 = 8 per micro-batch",
                   f"threads: {threads} per rank ({why})"):  # fmt: skip
        assert needle in start, (needle, start)


def test_evaluation_is_chosen_by_the_data_and_said_when_off(tmp_path):
    from dfm.evaluation.training import DigitsEvaluator, build_evaluator

    assert build_evaluator(tiny(tmp_path, "train.eval_every=0")) == (None, "")
    evaluator, note = build_evaluator(tiny(tmp_path, "train.eval_every=10"))
    assert isinstance(evaluator, DigitsEvaluator) and note == "eval: every 10 steps, digits classifier on 500 samples"
    latent = ["data.kind=latents", "data.data_dir=unused", "data.channels=4", "train.eval_every=10"]
    evaluator, note = build_evaluator(tiny(tmp_path, *latent))
    assert evaluator is None and note.startswith("eval: off for this latent run: train.eval_every needs train.eval_inc")
    weights = ["train.eval_inception_weights=w.pth", "train.eval_ref=ref.npz"]
    assert build_evaluator(tiny(tmp_path, *latent, *weights), decoder=None) == (
        None, "eval: off: no VAE decodes the samples (see the samples line)")  # fmt: skip
