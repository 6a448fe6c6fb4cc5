"""The generator fine-tuned on the labeled cases and the pseudo-labeled pool images together: does a
generator that has seen the pool's lesions (self-training's extra lesions) paint lesions that add
to those images, where one fine-tuned on the K labeled cases alone adds nothing measurable?

For each seed of SRC (an evaluation folder re-sampled with bench/resample.py --pool-judges, which
holds seed_S/labeled.csv, unlabeled.csv and pseudo/cases.csv), `meddiffft run` fine-tunes with
SRC's recipe (--run-args of its settings.json, the same seed and unlabeled pretraining) on the K
labeled cases plus the pseudo-labeled images, then paints into those images as SRC did
(--sample-args). OUT then reads like SRC for bench/self_training.py --with-synthetic:

    OMP_NUM_THREADS=1 nice .venv/bin/python bench/pseudo_finetune.py --src .busi/run_pool_div \\
        --out .busi/run_pool_pft --seeds 0 2 4 6
    OMP_NUM_THREADS=1 nice .venv/bin/python bench/self_training.py --src .busi/run_pool_pft \\
        --out .busi/run_pseudo_syn_pft --seeds 0 2 4 6 --with-synthetic
    .venv/bin/python bench/pool_subsets.py .busi/run_pseudo_syn_pft --baseline .busi/run_e2000 \\
        --versus .busi/run_pseudo_syn_div
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from folders import seeds_to_generate, src_out_parser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from MedDiffFTLib.caseio import read_cases_csv
    from MedDiffFTLib.cli import run_command

    parser = src_out_parser(__doc__, "an evaluation folder re-sampled with --pool-judges", "the new folder")
    parser.add_argument("--sample-args", default="--samples 2 --qa-keep 1 --old-lesion keep",
                        help="SRC's sampling options (bench/resample.py --sample-args)")
    args = parser.parse_args()
    settings = json.loads((args.src / "settings.json").read_text())
    for seed, src, out in seeds_to_generate(args):
        for name in ("subset.json", "labeled.csv"):
            shutil.copy(src / name, out / name)
        shutil.copytree(src / "pseudo", out / "pseudo", dirs_exist_ok=True)
        rows = read_cases_csv(str(src / "labeled.csv")) + read_cases_csv(str(out / "pseudo" / "cases.csv"))
        (out / "finetune.csv").write_text("image,label\n" + "".join(f"{image},{label}\n" for image, label in rows))
        began = time.monotonic()
        run_command(["run", "--cases", str(out / "finetune.csv"), "--unlabeled-cases", str(src / "unlabeled.csv"),
                     "--paint-into", str(out / "pseudo" / "cases.csv"), "--out", str(out / "generation"),
                     "--seed", str(seed), "--device", "cpu", "--progress", "none", "--resume",
                     *settings["run_args"], *shlex.split(args.sample_args)])
        kept = json.loads((out / "generation" / "manifest.json").read_text())["qa"]
        print(f"seed {seed}: fine-tuned on {len(rows)} cases, {time.monotonic() - began:.0f} s; kept {kept['kept']}; "
              f"rejections {kept['rejections_by_check']}", flush=True)


if __name__ == "__main__":
    main()
