"""The ``dfm`` command: ``dfm train``, ``sample``, ``export``, ``import``, ``prepare``, ``evaluate``, ``generate``."""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "train": ("dfm.launch.train", "train a SiT / DFM-SiT model from a config"),
    "sample": ("dfm.launch.sample", "sample a checkpoint into a PNG grid with per-stage previews (and .npz)"),
    "export": ("dfm.launch.export", "export a checkpoint's EMA weights to one safetensors file"),
    # a module cannot be named `import`
    "import": ("dfm.launch.import_checkpoint", "import a checkpoint of the authors' code, REPA or the SiT release"),
    "prepare": ("dfm.launch.prepare", "prepare ImageNet: convert images, encode SD-VAE latents"),
    "evaluate": ("dfm.launch.evaluate", "FID / sFID / IS / precision / recall of an .npz of samples"),
    "generate": ("dfm.launch.generate", "multi-rank sampling of many images into ADM's .npz layout"),
    # an experiment, not an entry point: it lives with the others in launch/experiments/
    "study-digits": ("dfm.launch.experiments.study_digits", "DFM vs SiT on the digits at equal steps and NFE"),
}


def usage() -> str:
    lines = ["usage: dfm <command> [args]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`dfm <command> --help` for the command's flags."]
    return "\n".join(lines)


def _user_errors() -> tuple[type[BaseException], ...]:
    """What bad input raises (a key, a file, a folder in use, a run gone non-finite): one line, no traceback.

    ``ValueError`` covers the config, store, checkpoint and unsafe-file errors, ``OSError`` missing files,
    permissions and a full disk.
    """
    from dfm.checkpoint import NonFiniteError
    from dfm.files import LockedError

    return (ValueError, OSError, LockedError, NonFiniteError)


def run_command(name: str, argv: list[str]) -> int:
    """Run ``dfm <name> argv``; bad input exits 1 with one line naming the key or file, Ctrl-C exits 130 with
    one line (``dfm train`` says the step and how to resume). ``--debug`` (or ``DFM_DEBUG=1``) shows the
    traceback instead."""
    debug = "--debug" in argv or os.environ.get("DFM_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    module = importlib.import_module(COMMANDS[name][0])
    try:
        result = module.main(argv)
    except _user_errors() as err:
        if debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"dfm {name}: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        if debug:
            raise
        print(f"dfm {name}: {str(err) or 'interrupted'}", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a process Ctrl-C stopped
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dfm: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return run_command(name, rest)


if __name__ == "__main__":
    sys.exit(main())
