"""``dfm prepare convert|encode|validate``: ImageNet → centre-cropped images → SD-VAE latent store.

    dfm prepare convert --source ILSVRC/Data/CLS-LOC/train --dest TARGET/images.zip \\
        --resolution 256x256 --transform center-crop-dhariwal
    dfm prepare encode --source TARGET/images.zip --dest TARGET/vae-sd --vae stabilityai/sd-vae-ft-mse
    torchrun --nproc_per_node=8 -m dfm.launch.prepare encode --source ... --dest ...   # one GPU per rank
    dfm prepare validate --data-dir TARGET --deep

Both steps resume when run again with the same flags; a rerun with other ones is refused, naming them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dfm.data.convert import TRANSFORMS, convert
from dfm.data.encode import encode
from dfm.data.store import MANIFEST, validate_store
from dfm.vae import DEFAULT_VAE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfm prepare", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="raw images (class folders or zip) → centre-cropped PNGs + dataset.json")
    c.add_argument("--source", required=True, help="image folder with class subfolders, or a zip of one")
    c.add_argument("--dest", required=True, help="output folder, or a path ending in .zip")
    c.add_argument("--resolution", default="256x256", help="WIDTHxHEIGHT, or one number for a square (default 256x256)")
    c.add_argument("--transform", default="center-crop-dhariwal", choices=TRANSFORMS)
    c.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    c.add_argument("--max-images", type=int, default=None, help="convert only the first N images")

    e = sub.add_parser("encode", help="converted images → SD-VAE moments in a packed latent store")
    e.add_argument("--source", required=True, help="output of `dfm prepare convert` (folder or zip)")
    e.add_argument("--dest", required=True, help="latent store folder (the seed calls it vae-sd)")
    e.add_argument("--vae", default=DEFAULT_VAE, help="AutoencoderKL: local folder or hub name")
    e.add_argument("--vae-subfolder", default=None, help="subfolder of --vae holding the VAE (e.g. 'vae')")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--chunk-size", type=int, default=1024, help="images per resumable part")
    e.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="stored moments dtype")
    e.add_argument("--layout", default="packed", choices=("packed", "files"), help="one array, or one .npy per image")
    e.add_argument("--procs", type=int, default=1, help="local processes (one per GPU); or launch with torchrun")
    e.add_argument("--rank", type=int, default=None, help="this rank (default: $RANK or 0)")
    e.add_argument("--world-size", type=int, default=None, help="number of ranks (default: $WORLD_SIZE or 1)")
    e.add_argument("--device", default="auto", help="'auto' (this rank's GPU, else CPU), 'cpu', 'cuda:0', ...")
    e.add_argument("--workers", type=int, default=2, help="image-decoding worker processes per rank")
    e.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of stopping")
    e.add_argument("--keep-parts", action="store_true", help="keep the per-chunk parts after packing")

    v = sub.add_parser("validate", help="check a latent store the way training does before it starts")
    v.add_argument("--data-dir", required=True)
    v.add_argument("--world-size", type=int, default=1)
    v.add_argument("--deep", action="store_true", help="also read every sample (non-finite values, file headers)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dfm prepare``."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "convert":
        report = convert(
            args.source, args.dest, args.resolution, args.transform, workers=args.workers, max_images=args.max_images
        )
        print(
            f"convert: {report.written} written, {report.reused} kept from an earlier run, "
            f"{len(report.skipped)} unreadable skipped -> {report.dest}"
        )
        for name, reason in report.skipped[:20]:
            print(f"  skipped {name}: {reason}")
        if len(report.skipped) > 20:
            print(f"  ... and {len(report.skipped) - 20} more (listed under 'skipped' in dataset.json)")
        return 0
    if args.command == "encode":
        finished = (Path(args.dest) / MANIFEST).exists()
        manifest = encode(
            args.source,
            args.dest,
            vae=args.vae,
            procs=args.procs,
            rank=args.rank,
            world_size=args.world_size,
            layout=args.layout,
            keep_parts=args.keep_parts,
            vae_subfolder=args.vae_subfolder,
            batch_size=args.batch_size,
            chunk_size=args.chunk_size,
            dtype=args.dtype,
            device=args.device,
            workers=args.workers,
            skip_bad=args.skip_bad,
        )
        if finished:  # encode checked that the store was made with these settings
            print(f"encode: {args.dest} is already a complete store of {args.source} with this VAE: nothing to do")
        elif manifest is not None:
            summary = {k: manifest[k] for k in ("count", "shape", "dtype", "num_classes", "scale", "stats")}
            print(f"encode: {args.dest}: {json.dumps(summary)}; {len(manifest.get('skipped', []))} images skipped")
        return 0
    store = validate_store(args.data_dir, world_size=args.world_size, deep=args.deep)
    print(
        f"{store.root}: {store.layout} store, {store.count} samples of {store.shape} {store.dtype}, "
        f"{store.num_classes} classes: ok"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
