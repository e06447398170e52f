"""Loading user-provided feature-network weights (state-dict files) with errors that name the file.

Nothing is downloaded. :func:`check_weights_file` says where a missing file comes from and verifies what
can be verified: a file named the torch-hub way (``name-<hex>.ext``, the hex being the start of its SHA-256,
as pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``) must hash to the prefix its name carries, and the
Inception weights are checked against the release's prefix (other weights give features, and FIDs, that are
not comparable with published ones).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from torch import Tensor, nn

from dfm.safe_load import load_torch_file


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a ``.safetensors`` file or a ``torch.save``-d ``.pt``/``.pth`` (tensors only).

    A checkpoint that wraps the weights under ``"state_dict"`` or ``"model"`` is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = load_torch_file(path)  # the weights-only unpickler: a crafted file is refused, nothing executes
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return state


def load_strict(model: nn.Module, state: dict[str, Tensor], path: str | Path) -> None:
    """``model.load_state_dict(state)`` with every key accounted for; a mismatch names the file and keys."""
    own = model.state_dict()
    # BatchNorm's step counter is not part of exported weights; load_state_dict fills it in when absent.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong_shape)):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{what}: {', '.join(keys[:5])}{more}")
        raise ValueError(f"{path}: does not fit {type(model).__name__}; " + "; ".join(parts))
    model.load_state_dict(state, strict=False)


# Where the weights come from (the files ADM-comparable numbers are computed with).
INCEPTION_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
INCEPTION_SHA256_PREFIX = "6726825d"  # the hash in the release's file name
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
_NAME_HASH = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")  # torch.hub's convention


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_weights_file(path: str | Path, what: str, url: str, release_prefix: str | None = None) -> dict:
    """``{"path", "sha256", "notes"}`` of a weights file after the checks in the module docstring.

    A missing file is a ``FileNotFoundError`` saying where the file comes from; a file whose content does not
    match the hash in its name is a ``ValueError``; weights other than the release (``release_prefix``) give a
    note, not an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file. Nothing is downloaded here: fetch the {what} weights from {url} and pass "
            "the file's path"
        )
    digest = sha256_file(path)
    claimed = _NAME_HASH.search(path.name)
    if claimed and not digest.startswith(claimed.group(1)):
        raise ValueError(
            f"{path}: its SHA-256 starts with {digest[:8]}, not with the {claimed.group(1)} its name carries "
            f"(truncated or altered?): fetch it again from {url}"
        )
    notes = []
    if release_prefix is not None and not digest.startswith(release_prefix):
        notes.append(
            f"{path.name} is not the released {what} file (SHA-256 {digest[:8]}..., the release's starts with "
            f"{release_prefix}): its scores are not comparable with published ones"
        )
    return {"path": str(path), "sha256": digest, "notes": notes}
