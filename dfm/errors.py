"""The one error a component raises about one of its own arguments.

Components (the model's config, the objective, the sampler, the flow space) check their arguments and know
nothing of config files; the config layer (``dfm.config``) names the config key behind an argument. An
:class:`ArgumentError` carries the argument's name as data, so that mapping is a dictionary lookup instead of a
reading of the message.
"""

from __future__ import annotations


class ArgumentError(ValueError):
    """``argument`` (the component's parameter name) is refused; ``detail`` says why, reading on from the name:
    ``ArgumentError("stage_weights", "must be finite, got [nan]")`` reads ``stage_weights must be finite, ...``."""

    def __init__(self, argument: str, detail: str):
        super().__init__(f"{argument}{'' if detail.startswith(':') else ' '}{detail}")
        self.argument, self.detail = argument, detail


__all__ = ["ArgumentError"]
