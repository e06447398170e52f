"""``dfm evaluate``: FID, sFID, Inception Score, precision, recall (and FDD) of an ADM-layout sample batch.

    dfm evaluate --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth [--dinov2-weights dinov2_vitl14_pretrain.pth]

Both files are ADM ``.npz`` batches (``arr_0``: uint8 N x H x W x 3); the reference may instead (or also)
carry ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` statistics, which then take precedence as in ADM's
evaluator. Weights are local files (nothing is downloaded). Prints a table and writes the numbers as JSON
(default: next to the samples, ``<samples>.metrics.json``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dfm.evaluation.dinov2 import load_dinov2
from dfm.evaluation.evaluator import evaluate_npz
from dfm.evaluation.inception import load_inception
from dfm.evaluation.metrics import IS_SPLIT_SIZE, PR_NEIGHBOURS

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
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    return args


def format_table(results: dict) -> str:
    """The metrics as an aligned two-column text table; unavailable ones show as 'n/a'."""
    lines = [f"{'metric':<16} {'value':>12}", "-" * 29]
    for label, key in ROWS:
        value = results.get(key)
        lines.append(f"{label:<16} {'n/a' if value is None else f'{value:.4f}':>12}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the evaluation; returns the JSON-written dict (metrics plus the inputs that produced them)."""
    args = parse_args(argv)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
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
    results = {
        **metrics,
        "samples": str(args.samples),
        "reference": str(args.ref),
        "inception_weights": str(args.inception_weights),
        "dinov2_weights": str(args.dinov2_weights) if args.dinov2_weights else None,
        "is_split_size": args.is_split_size,
        "k": args.k,
        "device": str(device),
        "seconds": round(time.perf_counter() - start, 2),
    }
    out = args.out or args.samples.with_suffix(".metrics.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{args.samples} ({metrics['num_samples']} images) vs {args.ref}")
    print(format_table(results))
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
