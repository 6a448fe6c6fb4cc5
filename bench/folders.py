"""The command line the bench scripts share that turn one evaluation folder (--src) into another
(--out), seed by seed."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def src_out_parser(doc: str, src_help: str, out_help: str) -> argparse.ArgumentParser:
    """A parser with --src, --out and --seeds; ``doc``'s first paragraph is its description."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--src", type=Path, required=True, help=src_help)
    parser.add_argument("--out", type=Path, required=True, help=out_help)
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    return parser


def seeds_to_generate(args: argparse.Namespace):
    """Start OUT as a copy of SRC's settings; yield (seed, SRC's seed folder, OUT's seed folder)
    for each seed whose generation OUT does not hold yet (a rerun continues)."""
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.src / "settings.json", args.out / "settings.json")
    for seed in args.seeds:
        src, out = args.src / f"seed_{seed}", args.out / f"seed_{seed}"
        if (out / "generation" / "manifest.json").is_file():
            continue
        out.mkdir(exist_ok=True)
        yield seed, src, out
