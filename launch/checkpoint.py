"""The DeepSpeed part of a checkpoint: the engine's own state files, read only after they are audited.

``dfm.checkpoint`` owns the checkpoint format (staging, manifest, verification, weights, trainer state);
:class:`DeepSpeedState` is the ``EngineState`` it calls for the engine: DeepSpeed's model-state and ZeRO
optimizer files (``*mp_rank_*_model_states.pt``, ``zero_pp_rank_<r>_*optim_states.pt``), and the full
trained weights gathered for ``model.safetensors``.

DeepSpeed reads its files with ``torch.load(weights_only=False)``, which runs any code a crafted pickle
names. Before it reads anything, :func:`audit_engine_files` lists the globals every ``.pt`` file in the
folder would import (``torch.serialization.get_unsafe_globals_in_checkpoint``, which executes nothing) and
refuses the folder, naming the file, if one is not among the few DeepSpeed itself pickles.

Resuming at another world size (or after a ZeRO-1/2/3 run lost or gained ranks) goes through DeepSpeed's
universal checkpoint: :func:`to_universal` converts the shards once, into ``<checkpoint>/universal``
(``deepspeed.checkpoint.ds_to_universal``), and the engine, built with ``checkpoint.load_universal``,
repartitions them (:func:`needs_universal` decides). A ZeRO-0 checkpoint loads at any world size directly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from dfm import distributed
from dfm.checkpoint import CheckpointError, read_manifest

UNIVERSAL = "universal"
# The globals DeepSpeed 0.19 pickles into its checkpoint files beyond what torch's weights-only loader
# allows anyway (tensors, containers, numbers): read off ZeRO 0-3 checkpoints of this project.
DEEPSPEED_GLOBALS = frozenset(
    {
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
)


def audit_engine_files(folder: str | Path, skip: tuple[str, ...] = (UNIVERSAL,)) -> None:
    """Refuse ``folder`` if any ``.pt`` file in it (but in the subfolders ``skip``) would import a global
    outside ``DEEPSPEED_GLOBALS``."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*.pt")):
        if path.relative_to(folder).parts[0] in skip:
            continue
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as err:  # not a zip archive, truncated central directory, ...
            raise CheckpointError(f"{path}: unreadable engine state ({' '.join(str(err).split())})") from None
        foreign = sorted(set(unsafe) - DEEPSPEED_GLOBALS)
        if foreign:
            raise CheckpointError(
                f"{path}: refused to load: its pickle imports {', '.join(foreign)}, which no DeepSpeed checkpoint "
                "holds (a crafted file?); nothing in it was executed"
            )


def saved_layout(ckpt_dir: str | Path) -> tuple[int, int]:
    """(world size, ZeRO stage) of the run that wrote ``ckpt_dir``."""
    manifest = read_manifest(ckpt_dir)
    return int(manifest["world_size"]), int(manifest["zero_stage"])


def needs_universal(ckpt_dir: str | Path, world_size: int, zero_stage: int, offload: bool = False) -> bool:
    """Whether resuming ``ckpt_dir`` at ``world_size`` must go through a universal checkpoint.

    ZeRO shards are tied to the world size that wrote them; a ZeRO-0 checkpoint is not. Changing the ZeRO
    stage or ZeRO-Offload on resume is refused: DeepSpeed does not document it as supported, and loading
    would take the saved engine's clipping setting (0 where our optimizer clipped) for the new optimizer.
    """
    saved_world, saved_stage = saved_layout(ckpt_dir)
    saved_offload = bool(read_manifest(ckpt_dir).get("offload", False))
    if (saved_stage, saved_offload) != (zero_stage, offload):
        raise CheckpointError(
            f"{ckpt_dir} was written with train.zero_stage={saved_stage}, train.offload={saved_offload}; resume it "
            f"with the same stage and offload (this run has train.zero_stage={zero_stage}, train.offload={offload})"
        )
    return zero_stage > 0 and saved_world != world_size


def to_universal(ckpt_dir: str | Path) -> Path:
    """Convert the ZeRO shards of ``ckpt_dir`` to ``<ckpt_dir>/universal`` once (rank 0; the others wait).

    The conversion (which unpickles the shards, so it runs after the audit) writes into a scratch directory
    that is renamed into place when complete, so an interrupted conversion is redone rather than half-read.
    """
    ckpt_dir = Path(ckpt_dir)
    out = ckpt_dir / UNIVERSAL

    def convert() -> None:
        if out.is_dir():
            return
        print(f"dfm train: converting {ckpt_dir} to DeepSpeed's universal checkpoint (another world size)")
        scratch = ckpt_dir / f".{UNIVERSAL}.tmp"
        shutil.rmtree(scratch, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt_dir),
               "--output_folder", str(scratch), "--num_extract_workers", "1", "--num_merge_workers", "1",
               "--inject_missing_state"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = " ".join((done.stdout + done.stderr)[-1500:].split())
            raise CheckpointError(f"universal conversion of {ckpt_dir} failed: {tail}")
        (ckpt_dir / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer; we pass the tag
        os.replace(scratch, out)

    distributed.agree(convert)  # rank 0 converts; a failure stops every rank
    return out


class DeepSpeedState:
    """The engine's part of a checkpoint (``dfm.checkpoint.EngineState``) for a DeepSpeed engine."""

    def __init__(self, engine, zero_stage: int):
        self.engine, self.zero_stage = engine, zero_stage

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        self.engine.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)

    def load(self, folder: Path) -> None:
        folder = Path(folder)
        if self.engine.load_universal_checkpoint():
            audit_engine_files(folder)  # before the conversion, which unpickles the shards
            to_universal(folder)
            audit_engine_files(folder / UNIVERSAL, skip=())
            load_path, _ = self.engine.load_checkpoint(str(folder), tag=UNIVERSAL)
        else:
            audit_engine_files(folder)
            load_path, _ = self.engine.load_checkpoint(str(folder.parent), tag=folder.name)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed found no engine state in {folder}")

    @torch.no_grad()
    def weights(self) -> dict[str, torch.Tensor]:
        """The full trained weights on rank 0 (fp32, CPU); a collective under ZeRO-3, which gathers each
        parameter in turn (one parameter's full size at a time, not the whole model)."""
        module, rank = self.engine.module, distributed.rank()
        if self.zero_stage < 3:
            return {k: v.detach().cpu() for k, v in module.state_dict().items()} if rank == 0 else {}
        import deepspeed

        out = {}
        for name, param in module.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if rank == 0:
                    out[name] = param.detach().float().cpu().clone()
        return out


__all__ = [
    "DEEPSPEED_GLOBALS",
    "DeepSpeedState",
    "audit_engine_files",
    "needs_universal",
    "saved_layout",
    "to_universal",
]
