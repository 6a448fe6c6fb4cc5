"""Pool the K-subsets of several `meddiffft evaluate` folders (e.g. one re-sampled with
bench/resample.py and one run later with more seeds) into one paired comparison per subset.

Each folder's seed_S/ holds the arms' records (ARM.json and, with --seg-repeats, ARM.repeatR.json:
test `dice_mean`, validation `history.val_dice`; an arm's repeats are averaged as evaluate does); a
subset is its seed, which must occur in one folder only. Prints, per
subset, the test and validation Dice of both arms, then the delta's mean +- sd, its paired t-test
and how many subsets gained (the validation delta is what a setting is judged on; test is only
reported). With --versus, two generators are compared on the subsets both hold (same real-only
arm): the synthetic arm of FOLDERS minus that of the --versus folders. With --baseline, the
real-only arm comes from other folders (e.g. one trained for more epochs, for an equal-steps
comparison; also --arm real_only with --versus compares two real-only budgets). --versus-arm compares
with another arm of the --versus folders (e.g. the same folders' real_plus_pseudo_labels: what
real_plus_pseudo_labels_and_synthetic's painted pairs add). Where arms have several
repeats (--seg-repeats), it also prints how far one segmenter seed lies from its subset's mean;
--repeats N pools only the first N. --unseen-only scores every arm on the test cases that no training
case resembles (evaluate.near_duplicates: BUSI's test split holds 7 copies or other frames of a
training image's lesion; report.json lists them since 2026-12-08).

    .venv/bin/python bench/pool_subsets.py /tmp/busi_eval/run_v1k /tmp/busi_eval/run_v1k2
    .venv/bin/python bench/pool_subsets.py /tmp/busi_eval/run_v1p /tmp/busi_eval/run_v1p2 \\
        --versus /tmp/busi_eval/run_v1k /tmp/busi_eval/run_v1k2
    .venv/bin/python bench/pool_subsets.py .busi/run_keep --baseline .busi/run_e2000
    .venv/bin/python bench/pool_subsets.py .busi/run_product_cover2{0..9} .busi/run_product_cover3{0,1} --unseen-only
    .venv/bin/python bench/pool_subsets.py .busi/run_product_pool .busi/run_product_pool13 \\
        --arm real_plus_pseudo_labels_and_synthetic --versus .busi/run_product_pool .busi/run_product_pool13 \\
        --versus-arm real_plus_pseudo_labels
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from MedDiffFTLib.caseio import read_case, read_cases_csv  # noqa: E402
from MedDiffFTLib.evaluate import (arm_dice, case_tensors, combine_repeats, near_duplicates,  # noqa: E402
                                   paired_test, unit_name)  # noqa: E402


def arm_results(folders: list[Path], arm: str, repeats: int | None = None) -> dict[int, dict]:
    """Per subset (seed): ``arm``'s result over its first ``repeats`` repeats (all when None), as
    evaluate combines them (test Dice ``dice_mean``, ``best_val_dice``, each repeat's Dice)."""
    results: dict[int, dict] = {}
    for folder in folders:
        for record in sorted(folder.glob(f"seed_*/{unit_name(arm, 0)}.json")):
            seed = int(record.parent.name.removeprefix("seed_"))
            if seed in results:
                raise SystemExit(f"subset {seed} occurs twice (in {record.parent}): pass each subset once")
            found = []
            for repeat in itertools.count():
                path = record.parent / f"{unit_name(arm, repeat)}.json"
                if not path.is_file() or repeat == repeats:
                    break
                found.append(json.loads(path.read_text()))
            results[seed] = combine_repeats(found)
    return results


def unseen_test_cases(folders: list[Path]) -> np.ndarray:
    """The test cases (True) that no training case resembles, for the CSVs all ``folders`` share."""
    recorded = [json.loads((folder / "settings.json").read_text()) for folder in folders]
    splits = {(r["train"], r["test"], r["segmenter"]["resolution"]) for r in recorded}
    if len(splits) != 1:
        raise SystemExit(f"--unseen-only needs folders of one split and segmenter resolution; these hold {splits}")
    train_csv, test_csv, resolution = splits.pop()
    train, test = ([case_tensors(read_case(image, label), resolution)[0] for image, label in read_cases_csv(csv)]
                   for csv in (train_csv, test_csv))
    keep = np.ones(len(test), dtype=bool)
    keep[[index for index, _, _ in near_duplicates(train, test)]] = False
    return keep


def scores(results: dict[int, dict], keep: np.ndarray | None = None) -> dict[int, tuple[float, float]]:
    """Per subset: (test Dice over the test cases in ``keep``, all when None; best validation Dice)."""
    return {seed: (arm_dice(r, keep), r["best_val_dice"]) for seed, r in results.items()}


def seed_noise(name: str, runs: list[np.ndarray]) -> None:
    """How far one segmenter seed's result lies from its subset's mean over repeats (pooled sd over
    the subsets with several repeats): the noise a single-repeat figure carries."""
    runs = [r for r in runs if len(r) > 1]
    if runs:
        pooled = np.sqrt(np.mean([np.var(r, ddof=1) for r in runs])) * 100
        print(f"{name}, one segmenter seed around its subset's mean: sd {pooled:.2f} points "
              f"({len(runs)} subset(s) with {min(map(len, runs))}+ repeats)")


def describe(name: str, after: dict[int, tuple[float, float]], before: dict[int, tuple[float, float]],
             confidence: float = 0.95) -> None:
    """Over the subsets of ``after``: the test delta's mean +- sd, its ``confidence`` interval and
    paired t-test (evaluate.paired_test); the validation delta."""
    (test_after, val_after), (test_before, val_before) = (np.array([d[s] for s in after]).T * 100
                                                          for d in (after, before))
    test, val = test_after - test_before, val_after - val_before
    p_value, low, high = paired_test(test_after, test_before, confidence)
    print(f"{name}: {len(test)} subsets; test {test.mean():+.2f} +- {test.std(ddof=1) if len(test) > 1 else 0:.2f} "
          f"points ({confidence * 100:g} % interval {low:+.2f} to {high:+.2f}; paired t p = {p_value:.3f}; "
          f"{int((test > 0).sum())} gained); validation {val.mean():+.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", type=Path, nargs="+", help="evaluation folders")
    parser.add_argument("--versus", type=Path, nargs="+", help="another generator's folders, same subsets")
    parser.add_argument("--baseline", type=Path, nargs="+", help="folders whose real_only arm is the baseline "
                                                                   "(default: FOLDERS)")
    parser.add_argument("--arm", default="real_plus_synthetic")
    parser.add_argument("--versus-arm", help="the --versus folders' arm (default: --arm)")
    parser.add_argument("--repeats", type=int, help="average only each arm's first N segmenter repeats "
                                                     "(default: all in the folders)")
    parser.add_argument("--unseen-only", action="store_true",
                        help="score the test cases no training case resembles (evaluate.near_duplicates)")
    parser.add_argument("--confidence", type=float, default=0.95,
                        help="level of the delta's interval (e.g. 0.975 for a second look at the same question)")
    args = parser.parse_args()
    keep = unseen_test_cases(args.folders + (args.baseline or []) + (args.versus or [])) if args.unseen_only else None
    if keep is not None:
        print(f"scored on the {keep.sum()} of {len(keep)} test cases no training case resembles")
    results = {"real_only": arm_results(args.baseline or args.folders, "real_only", args.repeats),
               args.arm: arm_results(args.folders, args.arm, args.repeats)}
    real, extra = (scores(results[arm], keep) for arm in ("real_only", args.arm))
    seeds = sorted(set(real) & set(extra))
    print("subset  real only (test, val)  with synthetic (test, val)  delta test, val (points)")
    for seed in seeds:
        (rt, rv), (et, ev) = real[seed], extra[seed]
        print(f"{seed:6d}  {rt:.3f} {rv:.3f}            {et:.3f} {ev:.3f}                  "
              f"{(et - rt) * 100:+.1f} {(ev - rv) * 100:+.1f}")
    repeats = {arm: {seed: np.array(r["repeats"]) for seed, r in found.items()} for arm, found in results.items()}
    for arm, runs in repeats.items():
        seed_noise(arm, list(runs.values()))
    paired = [(repeats[args.arm][s], repeats["real_only"][s]) for s in seeds]
    seed_noise("delta", [e[:len(r)] - r[:len(e)] for e, r in paired])  # repeat r of both arms shares its seed
    late = {arm: [found[s]["late_val_gain"] for s in seeds if found[s]["late_val_gain"] is not None]
            for arm, found in results.items()}  # None: under 8 validation checks
    print("late validation gain (last quarter of the budget minus the quarter before), points: "
          + ", ".join(f"{arm} {np.mean(gains) * 100:+.2f}" if gains else f"{arm} n/a"
                      for arm, gains in late.items()))
    real_test = np.array([real[s][0] for s in seeds])
    print(f"real only: test {real_test.mean():.3f} +- {real_test.std(ddof=1) if len(seeds) > 1 else 0:.3f}")
    describe(f"{args.arm} - real_only", {s: extra[s] for s in seeds}, real, args.confidence)
    if args.versus:
        versus_arm = args.versus_arm or args.arm
        other = scores(arm_results(args.versus, versus_arm, args.repeats), keep)
        shared = [s for s in seeds if s in other]
        describe(f"{args.arm} - --versus {versus_arm}", {s: extra[s] for s in shared}, other, args.confidence)


if __name__ == "__main__":
    main()
