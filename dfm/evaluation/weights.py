"""Loading user-provided feature-network weights (state-dict files) with errors that name the file."""

from __future__ import annotations

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
