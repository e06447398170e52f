"""The ``dfm`` command: ``dfm train``, ``sample``, ``export``, ``import``, ``prepare``, ``evaluate``, ``generate``."""

from __future__ import annotations

import importlib
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
    "study-digits": ("dfm.launch.study_digits", "DFM vs the SiT baseline on the digits at equal steps and NFE"),
}


def usage() -> str:
    lines = ["usage: dfm <command> [args]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`dfm <command> --help` for the command's flags."]
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dfm: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    module.main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
