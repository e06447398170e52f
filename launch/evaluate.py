"""``dfm evaluate``: FID, sFID, Inception Score, precision, recall (and FDD) of an ADM-layout sample batch.

    dfm evaluate --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth [--dinov2-weights dinov2_vitl14_pretrain.pth]

Both files are ADM ``.npz`` batches (``arr_0``: uint8 N x H x W x 3); the reference may instead (or also)
carry ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` statistics, which then take precedence as in ADM's
evaluator. Weights are local files; nothing is downloaded:

    Inception: https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
    DINOv2:    https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth

A weights file is checked against the SHA-256 prefix its name carries (torch hub's naming) and the Inception
file against the release's. Prints a table and writes the numbers, the weights' SHA-256 and any warnings as
JSON (default: next to the samples, ``<samples>.metrics.json``). Published numbers use 50,000 samples and
ADM's reference batches: far fewer samples bias FID upwards, and a small reference batch makes its
statistics and precision/recall noisy; both are warned about.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dfm.devices import resolve_device
from dfm.evaluation.dinov2 import load_dinov2
from dfm.evaluation.evaluator import evaluate_npz, open_batches
from dfm.evaluation.inception import load_inception
from dfm.evaluation.metrics import IS_SPLIT_SIZE, PR_NEIGHBOURS
from dfm.evaluation.weights import DINOV2_URL, INCEPTION_SHA256_PREFIX, INCEPTION_URL, check_weights_file
from dfm.files import check_output

PUBLISHED_SAMPLES = 50_000  # ADM's, DiT's and SiT's sample count for FID
FEW_SAMPLES = 10_000  # a fifth of it: FID's upward bias is then clearly visible
FEW_REFERENCE = 10_000  # ADM's reference batches hold 10,000 images

ROWS = (
    ("Inception Score", "inception_score"),
    ("FID", "fid"),
    ("sFID", "sfid"),
    ("Precision", "precision"),
    ("Recall", "recall"),
    ("FDD (DINOv2)", "fdd"),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="dfm evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--samples", required=True, type=Path, help="sample batch .npz (arr_0: uint8 N x H x W x 3)")
    p.add_argument(
        "--ref", required=True, type=Path, help="reference batch .npz (arr_0 and/or mu, sigma, mu_s, sigma_s)"
    )
    p.add_argument("--inception-weights", required=True, type=Path, help="InceptionV3 state dict (pytorch-fid layout)")
    p.add_argument("--dinov2-weights", type=Path, default=None, help="DINOv2 state dict (official layout) for FDD")
    p.add_argument("--batch-size", type=int, default=64, help="images per feature batch (default: 64, as ADM)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--out", type=Path, default=None, help="JSON output (default: <samples>.metrics.json)")
    p.add_argument(
        "--save-ref-stats", type=Path, default=None, help="write the reference statistics (mu, sigma, mu_s, ...) here"
    )
    p.add_argument("--is-split-size", type=int, default=IS_SPLIT_SIZE, help="samples per Inception Score split")
    p.add_argument("--k", type=int, default=PR_NEIGHBOURS, help="nearest neighbour for precision/recall radii")
    p.add_argument("--pr-batch-size", type=int, default=10000, help="rows/columns per pairwise-distance block")
    args = p.parse_args(argv)
    for flag in ("batch_size", "is_split_size", "k", "pr_batch_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    return args


def format_table(results: dict) -> str:
    """The metrics as an aligned two-column text table; unavailable ones show as 'n/a'."""
    lines = [f"{'metric':<16} {'value':>12}", "-" * 29]
    for label, key in ROWS:
        value = results.get(key)
        lines.append(f"{label:<16} {'n/a' if value is None else f'{value:.4f}':>12}")
    return "\n".join(lines)


def size_warnings(num_samples: int, num_reference: int | None) -> list[str]:
    """Warnings about sample and reference counts too small for numbers comparable with published ones."""
    out = []
    if num_samples < FEW_SAMPLES:
        out.append(
            f"{num_samples} samples: FID/sFID from far fewer than the {PUBLISHED_SAMPLES:,} of published numbers "
            "are biased upwards; compare only runs scored with the same sample count"
        )
    if num_reference is not None and num_reference < FEW_REFERENCE:
        out.append(
            f"the reference batch holds {num_reference} images (ADM's hold {FEW_REFERENCE:,}): its statistics, "
            "precision and recall are noisy"
        )
    return out


def main(argv: list[str] | None = None) -> dict:
    """Run the evaluation; returns the JSON-written dict (metrics plus the inputs that produced them)."""
    args = parse_args(argv)
    # Everything that can be refused is, before the weights are read and the features computed (minutes to
    # hours for 50,000 samples): the device, the inputs' headers and sizes, every output path.
    device = resolve_device(args.device)
    samples, _, ref_images = open_batches(args.samples, args.ref)
    if ref_images is not None and min(len(samples), len(ref_images)) <= args.k:
        # precision/recall take each image's k-th nearest neighbour within its own batch
        raise ValueError(
            f"--k {args.k} needs more than {args.k} images in --samples ({len(samples)}) and --ref "
            f"({len(ref_images)}); lower --k"
        )
    inputs = (args.samples, args.ref, args.inception_weights, *([args.dinov2_weights] if args.dinov2_weights else []))
    # A metrics file is evaluate's own output: rerunning replaces it. Its folder is not created.
    out = check_output(args.out or args.samples.with_suffix(".metrics.json"), "--out", force=True, inputs=inputs,
                       makes_folders=False)  # fmt: skip
    if args.save_ref_stats is not None:
        check_output(args.save_ref_stats, "--save-ref-stats", force=True, inputs=inputs, makes_folders=False)
    checked = [check_weights_file(args.inception_weights, "InceptionV3 (pytorch-fid)", INCEPTION_URL,
                                  INCEPTION_SHA256_PREFIX)]  # fmt: skip
    if args.dinov2_weights:
        checked.append(check_weights_file(args.dinov2_weights, "DINOv2", DINOV2_URL))
    start = time.perf_counter()
    inception = load_inception(args.inception_weights, device)
    dinov2 = load_dinov2(args.dinov2_weights, device) if args.dinov2_weights else None
    metrics = evaluate_npz(
        args.samples,
        args.ref,
        inception,
        dinov2,
        batch_size=args.batch_size,
        device=device,
        split_size=args.is_split_size,
        k=args.k,
        pr_batch_size=args.pr_batch_size,
        save_ref_stats=args.save_ref_stats,
    )
    warnings = [note for c in checked for note in c["notes"]]
    warnings += size_warnings(metrics["num_samples"], metrics["num_reference"])
    results = {
        **metrics,
        "samples": str(args.samples),
        "reference": str(args.ref),
        "inception_weights": str(args.inception_weights),
        "inception_sha256": checked[0]["sha256"],
        "dinov2_weights": str(args.dinov2_weights) if args.dinov2_weights else None,
        "dinov2_sha256": checked[1]["sha256"] if args.dinov2_weights else None,
        "warnings": warnings,
        "is_split_size": args.is_split_size,
        "k": args.k,
        "device": str(device),
        "seconds": round(time.perf_counter() - start, 2),
    }
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{args.samples} ({metrics['num_samples']} images) vs {args.ref}")
    print(format_table(results))
    for warning in warnings:
        print(f"dfm evaluate: warning: {warning}", file=sys.stderr)
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
