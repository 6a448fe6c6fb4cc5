"""Seconds per stage of one `meddiffft` command, from the wall-clock times of its progress events
(first to last event of each stage; steps = progress events, e.g. optimizer steps or samples), on whatever device the command names.

    python bench/stage_times.py run --cases K20.csv --out /tmp/r --resolution 64 --device cuda

Stages that emit no progress (loading, writing) show up as the gap between the total and the sum.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from MedDiffFTLib.cli import run_command

    started = time.monotonic()
    stages: dict[str, dict] = {}

    def show(name: str) -> None:
        stage = stages[name]
        span = stage["last"] - stage["first"]
        rate = (stage["events"] - 1) / span if span > 0 and stage["events"] > 1 else float("nan")
        print(f"{name:<24}{stage['first']:>8.1f}{stage['last']:>8.1f}{stage['events']:>8}{rate:>10.2f}", flush=True)

    def on_event(event: dict) -> None:
        if "stage" not in event:
            return
        now = time.monotonic() - started
        if event["stage"] not in stages and stages:
            show(list(stages)[-1])  # a stage ends when the next begins: printed now, in case of a kill
        stage = stages.setdefault(event["stage"], {"first": now, "events": 0})
        stage.update(last=now, events=stage["events"] + 1)

    print(f"{'stage':<24}{'from s':>8}{'to s':>8}{'steps':>8}{'steps/s':>10}", flush=True)
    run_command(sys.argv[1:] + ["--progress", "none"], on_progress=on_event)
    if stages:
        show(list(stages)[-1])
    print(f"{'total':<24}{0:>8.1f}{time.monotonic() - started:>8.1f}")


if __name__ == "__main__":
    main()
