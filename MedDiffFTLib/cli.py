"""The ``meddiffft`` command line: finetune, pretrain, sample, run and demo.

``run_command(argv, on_progress=..., should_cancel=...)`` runs a command in-process (the Slicer
bridge and batch scripts use it) and returns the final ``done`` event; ``main`` is the console
entry point (exit codes: 0 done, 1 unexpected error, 2 bad input, 3 cancelled).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import __version__
from .errors import Cancelled, MedDiffFTError
from .progress import Progress

EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 3


# ---------------------------------------------------------------------------------------------
# Options


class _Parser(argparse.ArgumentParser):
    """Option errors raise ``MedDiffFTError`` (in-process callers must not be exited)."""

    def error(self, message: str):
        raise MedDiffFTError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _add_common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run control")
    group.add_argument("--seed", type=int, default=0,
                       help="seed for everything (training batches, noise; sample k uses SEED+k)")
    group.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                       help="where to compute; auto = CUDA when available (default: auto)")
    group.add_argument("--progress", default="bar", choices=("bar", "json", "none"),
                       help="tqdm bars on stderr, one JSON object per line on stdout (for the "
                            "Slicer module), or nothing (default: bar)")
    group.add_argument("--cancel-file", metavar="PATH",
                       help="stop (exit code 3, nothing written) as soon as PATH exists")
    group.add_argument("--overwrite", action="store_true",
                       help="replace an existing non-empty output folder")


def _add_inputs(parser: argparse.ArgumentParser, *, what: str) -> None:
    group = parser.add_argument_group(what)
    group.add_argument("--image", action="append", default=[], metavar="PATH",
                       help="image: NRRD, NIfTI, MHA or a 2D PNG/JPG/GIF/BMP; repeat for several "
                            "cases (paired in order with --label)")
    group.add_argument("--label", action="append", default=[], metavar="PATH",
                       help="label of the preceding --image: a labelmap in any of those formats "
                            "or a Slicer .seg.nrrd")
    group.add_argument("--cases", metavar="CSV", help="CSV with columns image,label (instead of, or "
                                                      "with, --image/--label)")
    group.add_argument("--segment", metavar="NAME_OR_VALUE",
                       help="which label to use: a .seg.nrrd segment name, or a label value "
                            "(default: all non-zero labels as one foreground)")
    group.add_argument("--resample-label", action="store_true",
                       help="resample a label that is not on the image grid onto it (nearest "
                            "neighbour); otherwise such a label is an error")


def _add_slicing(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("slices")
    group.add_argument("--resolution", type=int, default=64,
                       help="working resolution of the model in px (default: 64)")
    group.add_argument("--axis", default="auto",
                       help="slicing axis: auto (largest spacing; ties: 0), 0, 1 or 2 (array axes "
                            "Z, Y, X); 2D images have one slice (default: auto)")
    group.add_argument("--intensity", default="auto",
                       help="per-case normalization with an exact inverse: auto (8-bit: 0..255, "
                            "else percentile), percentile (0.5..99.5) or window:CENTRE,WIDTH")
    group.add_argument("--roi", default="auto", choices=("auto", "on", "off"),
                       help="work on a window around the lesion at native resolution (on), on the "
                            "whole slice resized (off), or on unless the window covers the slice "
                            "(auto, default)")
    group.add_argument("--context", type=float, default=0.5,
                       help="ROI context on each side, as a fraction of the lesion size (default 0.5)")
    group.add_argument("--scale", default="native", choices=("native", "fit"),
                       help="native (default): keep each lesion window's native pixels (up to 4x "
                            "--resolution) and train on --resolution-px crops, so lesions get the "
                            "tissue's sharpness (on BUSI: high-frequency energy 0.65 vs 0.37 for "
                            "fit, real 0.64; bench/busi_levers.sh); fit: carry the window to "
                            "--resolution px (faster sampling of large lesions)")


def _add_training(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--backbone", default="compact", choices=("compact",),
                       help="inpainting backbone (default: compact, pixel space, trained from scratch)")
    group.add_argument("--model-size", default="small", choices=("tiny", "small", "base"),
                       help="compact UNet size: tiny (tests), small (CPU default), base")
    group.add_argument("--train-steps", type=int, default=600, help="optimizer steps (default 600)")
    group.add_argument("--train-minutes", type=float,
                       help="stop training after this many minutes (a time budget instead of steps)")
    group.add_argument("--batch-size", type=int, default=8, help="training batch size (default 8)")
    group.add_argument("--learning-rate", type=float, default=2e-4, help="AdamW learning rate")
    group.add_argument("--lesion-weight", type=float, default=2.0,
                       help="loss weight 1 + W inside the inpainted region (0 = plain MSE)")
    group.add_argument("--checkpoint-every", type=int, default=200,
                       help="write a resumable checkpoint every N steps (default 200)")
    group.add_argument("--init-model", metavar="DIR",
                       help="start from a pretrained model folder (see `meddiffft pretrain`)")
    group.add_argument("--unlabeled", action="append", default=[], metavar="PATH",
                       help="unlabeled image/volume for inpainting pretraining with random masks "
                            "before fine-tuning (repeatable)")
    group.add_argument("--unlabeled-cases", metavar="CSV", help="CSV with an image column of unlabeled data")
    group.add_argument("--pretrain-steps", type=int,
                       help="pretraining steps on unlabeled data (default: --train-steps when "
                            "unlabeled data is given, else 0)")


def _add_sampling(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--samples", type=int, default=4, help="samples per case (default 4)")
    group.add_argument("--sampling-steps", type=int, default=25, help="solver steps (default 25)")
    group.add_argument("--sampler", default="dpmsolver++", choices=("dpmsolver++", "sde-dpmsolver++", "ddpm"),
                       help="dpmsolver++ (deterministic, default), sde-dpmsolver++ or ddpm (stochastic)")
    group.add_argument("--init", default="noise", choices=("noise", "transplant"),
                       help="start from noise, or from a real training lesion pasted under the "
                            "guide mask and noised to --strength (keeps real lesion texture)")
    group.add_argument("--strength", type=float, default=0.7,
                       help="noise strength of a transplant start, 0..1 (default 0.7)")
    group.add_argument("--mask-source", default="label", choices=("label", "jitter"),
                       help="guide mask: the case's label, or the label randomly moved, scaled and "
                            "rotated within bounds (the old lesion is healed)")
    group.add_argument("--jitter", dest="mask_source", action="store_const", const="jitter",
                       help="same as --mask-source jitter")
    group.add_argument("--background", action="append", default=[], metavar="PATH",
                       help="lesion-free image/volume to paint into instead of the case itself "
                            "(repeatable; samples cycle through them)")
    group.add_argument("--seam", type=int, default=3,
                       help="feathered seam around the mask, native px, 0..8: farther out the "
                            "output equals the input exactly (default 3)")
    group.add_argument("--slice-batch", type=int, default=16, help="slices per forward pass")


def _add_model_out(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model folder")
    group.add_argument("--model-out", required=True, metavar="DIR", help="model folder to write")
    group.add_argument("--resume", action="store_true",
                       help="continue an interrupted run from its last checkpoint in DIR/checkpoints")
    group.add_argument("--keep-checkpoints", action="store_true",
                       help="keep DIR/checkpoints after training")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="meddiffft",
        description="MedDiffFT: fine-tune a diffusion inpainting model on a few labeled medical "
                    "images, then paint new lesions into real backgrounds to make realistic, "
                    "correctly labeled synthetic image+label pairs.")
    parser.add_argument("--version", action="version", version=f"meddiffft {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    finetune = commands.add_parser("finetune", help="fine-tune a model folder on labeled cases",
                                   description="Fine-tune the backbone on labeled cases and write a "
                                               "model folder (safetensors + meddiffft.json).")
    _add_inputs(finetune, what="training cases")
    _add_slicing(finetune)
    _add_training(finetune)
    _add_model_out(finetune)
    _add_common(finetune)

    pretrain = commands.add_parser("pretrain", help="pretrain a general inpainter on unlabeled data",
                                   description="Pretrain the compact backbone with random masks on "
                                               "unlabeled images; fine-tune from it with --init-model.")
    _add_slicing(pretrain)
    _add_training(pretrain)
    _add_model_out(pretrain)
    _add_common(pretrain)

    sample = commands.add_parser("sample", help="generate pairs with a model folder",
                                 description="Generate synthetic image+label pairs for each case.")
    sample.add_argument("--model", required=True, metavar="DIR", help="model folder")
    _add_inputs(sample, what="cases to generate from")
    _add_sampling(sample)
    sample.add_argument("--out", required=True, metavar="DIR", help="output folder")
    _add_common(sample)

    run = commands.add_parser("run", help="fine-tune and sample in one call",
                              description="Fine-tune on the cases, then generate pairs for each; "
                                          "the model is kept in OUT/model.")
    _add_inputs(run, what="cases")
    _add_slicing(run)
    _add_training(run)
    _add_sampling(run)
    run.add_argument("--out", required=True, metavar="DIR", help="output folder")
    _add_common(run)

    demo = commands.add_parser("demo", help="run everything on a generated phantom (CPU, minutes)",
                               description="Make an ultrasound-like phantom, fine-tune the compact "
                                           "backbone on it and generate samples; prints the preview.")
    demo.add_argument("--out", default="meddiffft-demo", metavar="DIR",
                      help="output folder (default: ./meddiffft-demo)")
    demo.add_argument("--train-steps", type=int, default=300, help="optimizer steps (default 300)")
    demo.add_argument("--samples", type=int, default=4, help="samples (default 4)")
    _add_common(demo)
    return parser


# ---------------------------------------------------------------------------------------------
# Commands


def _read_inputs(args, *, allow_empty: bool = False) -> list:
    from .caseio import read_case, read_cases_csv

    if len(args.image) != len(args.label):
        raise MedDiffFTError(f"Got {len(args.image)} --image and {len(args.label)} --label options; "
                             "give one --label after each --image.")
    pairs = list(zip(args.image, args.label))
    if args.cases:
        pairs += read_cases_csv(args.cases)
    if not pairs:
        raise MedDiffFTError("No cases given: pass --image IMG --label LABEL (repeatable) or --cases CSV.")
    return [read_case(image, label, segment=args.segment, resample_label=args.resample_label,
                      allow_empty=allow_empty) for image, label in pairs]


def _read_unlabeled(args) -> list:
    from .caseio import read_case, read_cases_csv

    paths = list(args.unlabeled)
    if args.unlabeled_cases:
        paths += [image for image, _ in read_cases_csv(args.unlabeled_cases)]
    return [read_case(path, None, require_label=False) for path in paths]


def _settings(args):
    from .finetune import SliceSettings, TrainSettings

    slices = SliceSettings(resolution=args.resolution, axis=str(args.axis), intensity=args.intensity,
                           roi=args.roi, context=args.context, scale=args.scale)
    unlabeled_given = bool(args.unlabeled or args.unlabeled_cases)
    pretrain_steps = args.pretrain_steps if args.pretrain_steps is not None else (
        args.train_steps if unlabeled_given else 0)
    for name in ("train_steps", "batch_size", "checkpoint_every", "resolution"):
        if getattr(args, name) <= 0:
            raise MedDiffFTError(f"--{name.replace('_', '-')} must be positive.")
    train = TrainSettings(steps=args.train_steps, minutes=args.train_minutes,
                          pretrain_steps=pretrain_steps, batch_size=args.batch_size,
                          learning_rate=args.learning_rate, lesion_weight=args.lesion_weight,
                          seed=args.seed, checkpoint_every=args.checkpoint_every,
                          model_size=args.model_size)
    return slices, train


def _sample_settings(args):
    from .generate import SampleSettings

    if args.samples <= 0 or args.sampling_steps <= 0:
        raise MedDiffFTError("--samples and --sampling-steps must be positive.")
    return SampleSettings(samples=args.samples, seed=args.seed, sampling_steps=args.sampling_steps,
                          sampler=args.sampler, init=args.init, strength=args.strength,
                          mask_source=args.mask_source, seam=args.seam, slice_batch=args.slice_batch)


def _prepare_model_out(path: Path, args) -> None:
    from .outputs import check_output_dir

    if args.resume and (path / "checkpoints").is_dir():
        return
    if args.overwrite and path.exists():
        shutil.rmtree(path)
    check_output_dir(path, False, what="--model-out")


def _finetune_stages(args, cases: list, progress: Progress) -> list:
    """The model folder's other parts, trained on the labeled ``cases`` (see finetune_model)."""
    return []


def _finetune(args, progress: Progress, model_out: Path, cases: list, unlabeled: list) -> dict:
    from .backbone import resolve_device
    from .finetune import finetune_model

    slices, train = _settings(args)
    return finetune_model(cases, model_out=model_out, slices=slices, settings=train,
                          device=resolve_device(args.device), progress=progress, unlabeled=unlabeled,
                          init_model=args.init_model, keep_checkpoints=getattr(args, "keep_checkpoints", False),
                          extra_stages=_finetune_stages(args, cases, progress))


def _sample_into(directory: Path, model_dir: Path, cases: list, args, progress: Progress,
                 recorded_model: Path) -> dict:
    """Generate for every case into ``directory`` (staged); write samples, manifest and preview.
    ``recorded_model`` is the model folder's final path, for the manifest."""
    from .backbone import load_model, resolve_device
    from .caseio import read_case
    from .generate import generate_samples
    from .outputs import write_json, write_preview, write_samples

    settings = _sample_settings(args)
    backgrounds = [read_case(path, None, require_label=False) for path in args.background]
    backbone, card, bank = load_model(model_dir, resolve_device(args.device))
    entries, rejected, first_samples = [], [], []
    for case in cases:
        samples, dropped = generate_samples(backbone, card, bank, case, settings=settings,
                                            progress=progress, backgrounds=backgrounds)
        for entry in write_samples(directory, samples, case, start=len(entries)):
            entry.update({"backbone": card["backbone"], "sampling_steps": settings.sampling_steps,
                          "sampler": settings.sampler, "init": settings.init,
                          "strength": settings.strength if settings.init == "transplant" else None,
                          "seam_px": settings.seam})
            entries.append(entry)
        rejected += dropped
        first_samples = first_samples or samples
    write_json(directory / "manifest.json", {"samples": entries, "rejected": rejected,
                                             "model": {"path": str(recorded_model), **card}})
    write_preview(directory / "preview.png", cases[0], first_samples, card["slices"]["axis"])
    return {"samples": len(entries), "preview": str(directory / "preview.png")}


def command_finetune(args, progress: Progress) -> dict:
    cases = _read_inputs(args, allow_empty=True)
    unlabeled = _read_unlabeled(args)
    model_out = Path(args.model_out)
    _prepare_model_out(model_out, args)
    _finetune(args, progress, model_out, cases, unlabeled)
    return {"out": str(model_out), "model": str(model_out)}


def command_pretrain(args, progress: Progress) -> dict:
    from .backbone import resolve_device
    from .finetune import finetune_model

    unlabeled = _read_unlabeled(args)
    if not unlabeled:
        raise MedDiffFTError("pretrain needs unlabeled data: pass --unlabeled PATH or --unlabeled-cases CSV.")
    model_out = Path(args.model_out)
    _prepare_model_out(model_out, args)
    slices, train = _settings(args)
    train.pretrain_steps, train.steps = train.steps, 0
    finetune_model([], model_out=model_out, slices=slices, settings=train,
                   device=resolve_device(args.device), progress=progress, unlabeled=unlabeled,
                   init_model=args.init_model, keep_checkpoints=args.keep_checkpoints)
    return {"out": str(model_out), "model": str(model_out)}


def command_sample(args, progress: Progress) -> dict:
    from .backbone import read_model_card
    from .outputs import staged_dir

    read_model_card(args.model)
    cases = _read_inputs(args)
    out = Path(args.out)
    with staged_dir(out, args.overwrite) as tmp:
        result = _sample_into(tmp, Path(args.model), cases, args, progress, Path(args.model))
    return {"out": str(out), "model": str(Path(args.model)), **result,
            "preview": str(out / "preview.png")}


def command_run(args, progress: Progress) -> dict:
    from .outputs import staged_dir

    cases = _read_inputs(args)
    unlabeled = _read_unlabeled(args)
    _sample_settings(args)
    out = Path(args.out)
    with staged_dir(out, args.overwrite) as tmp:
        _finetune(args, progress, tmp / "model", cases, unlabeled)
        result = _sample_into(tmp, tmp / "model", cases, args, progress, out / "model")
    return {"out": str(out), "model": str(out / "model"), **result, "preview": str(out / "preview.png")}


def command_demo(args, progress: Progress) -> dict:
    from PIL import Image

    from .outputs import check_output_dir
    from .phantom import ultrasound_phantom

    out = Path(args.out)
    check_output_dir(out, args.overwrite)
    if out.exists():
        shutil.rmtree(out)
    phantom_dir = out / "phantom"
    phantom_dir.mkdir(parents=True)
    progress.message("MedDiffFT demo: the input is a procedurally generated ultrasound-like "
                     f"phantom (no real data), written to {phantom_dir}.")
    argv = ["run", "--out", str(out / "run"), "--train-steps", str(args.train_steps),
            "--samples", str(args.samples), "--seed", str(args.seed), "--device", args.device,
            "--mask-source", "jitter"]
    for index in range(4):
        image, mask = ultrasound_phantom(seed=args.seed + index)
        Image.fromarray(image).save(phantom_dir / f"phantom_{index}.png")
        Image.fromarray(mask).save(phantom_dir / f"phantom_{index}_mask.png")
        argv += ["--image", str(phantom_dir / f"phantom_{index}.png"),
                 "--label", str(phantom_dir / f"phantom_{index}_mask.png")]
    result = _dispatch(build_parser().parse_args(argv), progress)
    progress.message(f"Preview: {result['preview']}")
    return {**result, "phantom": str(phantom_dir)}


COMMANDS: dict[str, Callable] = {"finetune": command_finetune, "pretrain": command_pretrain,
                                 "sample": command_sample, "run": command_run, "demo": command_demo}


def _dispatch(args, progress: Progress) -> dict:
    return COMMANDS[args.command](args, progress)


def _execute(args, progress: Progress) -> dict:
    """Run the parsed command and emit its ``done`` event."""
    started = time.monotonic()
    result = {"event": "done", **_dispatch(args, progress),
              "seconds": round(time.monotonic() - started, 2)}
    progress.emit(result)
    return result


def run_command(argv: list[str], *, on_progress: Callable[[dict], None] | None = None,
                should_cancel: Callable[[], bool] | None = None) -> dict:
    """Run one command in-process; returns the ``done`` event. Raises ``MedDiffFTError`` for bad
    input and ``Cancelled`` when ``should_cancel()`` (or the ``--cancel-file``) asks to stop."""
    args = build_parser().parse_args([str(a) for a in argv])
    progress = Progress(args.progress if on_progress is None else "none", on_progress, should_cancel,
                        args.cancel_file)
    return _execute(args, progress)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
    except MedDiffFTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    json_mode = args.progress == "json"
    progress = Progress(args.progress, None, None, args.cancel_file)

    def fail(message: str, code: int) -> int:
        if json_mode:
            print(json.dumps({"event": "error", "message": message}), flush=True)
        else:
            print(f"meddiffft: error: {message}", file=sys.stderr)
        return code

    try:
        result = _execute(args, progress)
        if args.progress == "bar":
            print(f"Done: {result['out']}" + (f" (preview: {result['preview']})" if "preview" in result else ""))
        return 0
    except Cancelled as exc:
        return fail(str(exc), EXIT_CANCELLED)
    except MedDiffFTError as exc:
        return fail(str(exc), EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        return fail("Interrupted; nothing was written.", EXIT_CANCELLED)
    except Exception as exc:  # an unexpected failure still ends with one error event for callers
        if not json_mode:
            raise
        return fail(f"{type(exc).__name__}: {exc}", 1)


if __name__ == "__main__":
    sys.exit(main())
