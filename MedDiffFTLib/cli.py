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
from .masks import LESION_SIZES, OLD_LESION, PLACEMENTS
from .progress import Progress

EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 3


# ---------------------------------------------------------------------------------------------
# Options


class _Parser(argparse.ArgumentParser):
    """Option errors raise ``MedDiffFTError`` (in-process callers must not be exited)."""

    def error(self, message: str):
        raise MedDiffFTError(f"{self.prog}: {message} (see `{self.prog} --help`)")

    def parse_args(self, args=None, namespace=None):
        """Training options left unset take the chosen backbone's and recipe's defaults."""
        parsed = super().parse_args(args, namespace)
        if hasattr(parsed, "recipe") and hasattr(parsed, "train_steps"):  # commands that train
            from .finetune import recipe_defaults

            for name, value in recipe_defaults(parsed.backbone, parsed.recipe).items():
                if getattr(parsed, name, "") is None:
                    setattr(parsed, name, value)
        return parsed


def _add_common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run control")
    group.add_argument("--seed", type=int, default=0,
                       help="seed for everything (training batches; each case's sample k draws its lesion and "
                            "noise from SEED, k and the case's image, so cases differ)")
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
    group.add_argument("--resolution", type=int,
                       help="working resolution of the model in px (default: 64 compact, 512 "
                            "sd-inpaint; 256 is sd-inpaint's small-GPU/CPU mode)")
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
    group.add_argument("--backbone", default="compact", choices=("compact", "sd-inpaint"),
                       help="inpainting backbone: compact (default; pixel space, trained from "
                            "scratch) or sd-inpaint (a Stable Diffusion inpainting checkpoint, "
                            "see --base-model)")
    group.add_argument("--model-size", default="small", choices=("tiny", "small", "base"),
                       help="compact UNet size: tiny (tests), small (CPU default), base")
    group.add_argument("--context-slices", type=int, default=0, metavar="N",
                       help="compact backbone: also feed the model the N slices below and the N "
                            "above the painted one along the slicing axis (trained on the real "
                            "neighbours, each with the region zeroed half of the time; at "
                            "generation the neighbours already generated as they are, the others "
                            "as the background with the region to regenerate zeroed; past the "
                            "volume's ends the edge slice is repeated, but a slice never sees "
                            "itself: zeros there and for 2D images). Stored in the model folder, "
                            "so `sample` needs no option. Default 0: no context")
    group.add_argument("--recipe", choices=("default", "reference"),
                       help="default, or reference: the reference code's sd-inpaint recipe (full "
                            "UNet, lr 3e-6, AdamW wd 1e-2, clip 1, batch 1 x accumulation 2, 500 "
                            "steps, 512 px, fp32, exact masks, plain MSE, prompt 'a photo of hta'; "
                            "sampling: 50 DDIM steps, CFG 7.5); options given explicitly still win")
    group.add_argument("--train-steps", type=int, help="optimizer steps (default 600)")
    group.add_argument("--train-minutes", type=float,
                       help="stop training after this many minutes (a time budget instead of steps)")
    group.add_argument("--batch-size", type=int, help="training batch size (default 8 compact, 2 sd-inpaint)")
    group.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    group.add_argument("--learning-rate", type=float,
                       help="AdamW learning rate (default 2e-4 compact, 1e-4 sd-inpaint)")
    group.add_argument("--lesion-weight", type=float,
                       help="loss weight 1 + W inside the inpainted region (0 = plain MSE; default 2)")
    group.add_argument("--optimizer", choices=("adamw", "adamw-8bit"),
                       help="adamw (default) or adamw-8bit (needs bitsandbytes, CUDA)")
    sd = parser.add_argument_group("sd-inpaint backbone")
    sd.add_argument("--base-model", metavar="DIR_OR_HUB_ID",
                    help="diffusers StableDiffusionInpaintPipeline folder (safetensors), or a hub id "
                         "such as stable-diffusion-v1-5/stable-diffusion-inpainting (CreativeML "
                         "OpenRAIL-M licence; downloaded only when named)")
    sd.add_argument("--finetune", choices=("lora", "full"),
                    help="lora (default: adapters on the UNet attention projections + conv_in) or full")
    sd.add_argument("--lora-rank", type=int, help="LoRA rank (default 8)")
    sd.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank)")
    sd.add_argument("--lora-targets", metavar="NAMES",
                    help="comma-separated UNet module names for LoRA (default to_q,to_k,to_v,to_out.0)")
    sd.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                    help="autocast dtype: auto (default) = bf16 on GPUs and CPUs that support it, else fp32")
    sd.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                    help="recompute UNet activations in the backward pass: less memory, more time (default on)")
    sd.add_argument("--attention", choices=("sdpa", "classic"),
                    help="attention kernel: sdpa (default, torch scaled_dot_product_attention) or classic")
    sd.add_argument("--latent-pool", type=int,
                    help="train on a fixed pool of N drawn windows whose VAE latents are computed "
                         "once (default 64 sd-inpaint; 0 = fresh windows every step)")
    sd.add_argument("--no-latent-cache", action="store_true",
                    help="encode the pool's windows at every step instead of once (for comparison)")
    sd.add_argument("--prompt", help="lesion prompt (default 'a photo of hta lesion'; at sampling: the model's)")
    sd.add_argument("--heal-prompt", help="prompt for healing tissue (default 'a photo of hta tissue')")
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


def _add_quality(parser: argparse.ArgumentParser, *, reference: bool, filtering: bool) -> None:
    group = parser.add_argument_group("quality assessment")
    group.add_argument("--qa", default="on", choices=("on", "off"),
                       help="on (default): fine-tuning builds a quality reference from the labeled "
                            "lesions (model folder's quality/), sampling scores every sample "
                            "(realism, paint, memorization, mask faithfulness, healed; manifest "
                            "\"qa\") and rejects those below the thresholds calibrated on the real "
                            "lesions")
    if reference:
        group.add_argument("--qa-percentile", type=float, default=95.0,
                           help="share (%%) of real lesions each calibrated check lets pass (default 95)")
        group.add_argument("--qa-folds", type=int, default=3,
                           help="cross-fitting folds of the faithfulness segmenters (default 3)")
        group.add_argument("--qa-segmenter-steps", type=int, default=300,
                           help="training steps of each faithfulness segmenter (default 300)")
        group.add_argument("--qa-segmenter-resolution", type=int, default=64,
                           help="faithfulness segmenter input side in px, a multiple of 8 (default 64)")
    if filtering:
        group.add_argument("--qa-keep", type=int, metavar="N",
                           help="keep the N best passing samples of --samples per case (ranked by "
                                "the overall QA score); the others are listed in the manifest's "
                                "\"rejected\" with the reason, not written")


def _add_placement(group) -> None:
    """Where the mask generator puts a new lesion (sample and masks draw the same masks)."""
    group.add_argument("--allowed-region", metavar="PATH_OR_SEGMENT",
                       help="where generated lesions may go: a mask file on the image's grid, or a "
                            "segment name/label value of the image's own label (e.g. the organ); "
                            "default: the image's body (Otsu foreground)")
    group.add_argument("--old-lesion", default="heal", choices=OLD_LESION,
                       help="the background's own lesion: heal (default; painted over as tissue, "
                            "the label no longer marks it), keep (with --mask-source generator: "
                            "it stays real and labeled, and the new lesion is placed clear of it, "
                            "so no half-healed lesion can sit under a background label) or cover "
                            "(with --mask-source generator: the new lesion, 1-2x its area, is "
                            "painted over it, so the image keeps one lesion, all of it labeled)")
    group.add_argument("--placement", default="uniform", choices=PLACEMENTS,
                       help="where in the allowed region a generated lesion goes: uniform (default; "
                            "anywhere) or learned (near where a labeled lesion lies in its image, "
                            "relative to the frame)")
    group.add_argument("--lesion-size", default="range", choices=LESION_SIZES,
                       help="a generated lesion's size: range (default; log-uniform over the labeled "
                            "lesions' size range, so mostly small ones) or real (about the size of a "
                            "labeled lesion, as the labeled sizes are distributed)")


def _placement_options(args) -> dict:
    return {"allowed_region": args.allowed_region, "old_lesion": args.old_lesion, "placement": args.placement,
            "lesion_size": args.lesion_size}


def _add_mask_generator(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("mask generator")
    group.add_argument("--mask-steps", type=int, default=300,
                       help="training steps of the mask generator, a small diffusion model on the "
                            "labeled lesions' shapes (model folder's mask_generator/; default 300, "
                            "tens of seconds on a CPU; 0 = none: sample with --mask-source label "
                            "or jitter)")
    group.add_argument("--mask-resolution", type=int, default=32,
                       help="side of the mask generator's shape frame in px, a multiple of 4 "
                            "(default 32: lesion outlines are smooth, and 64 trains 4x slower)")


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
    group.add_argument("--mask-source", default="generator", choices=("label", "jitter", "generator"),
                       help="guide mask: generator (default) draws a new lesion from the model "
                            "folder's mask generator and places it inside --allowed-region; label "
                            "keeps the case's label; jitter moves, scales and rotates it within "
                            "bounds (the old lesion is healed, see --old-lesion)")
    _add_placement(group)
    group.add_argument("--erode", default="auto", metavar="auto|0|PX",
                       help="mask corrosion of the output label, in-plane per slice: auto (default; "
                            "a radius of 5%% of each lesion slice's equivalent radius, so lesions "
                            "under ~10 px radius keep their label), 0 (label = guide mask) or a "
                            "radius in px; a lesion is never eroded to nothing")
    group.add_argument("--erode-changed", action="store_true",
                       help="also drop label pixels the model left unchanged (holes filled)")
    group.add_argument("--jitter", dest="mask_source", action="store_const", const="jitter",
                       help="same as --mask-source jitter")
    group.add_argument("--background", action="append", default=[], metavar="PATH",
                       help="lesion-free image/volume to paint into instead of the case itself "
                            "(repeatable; samples cycle through them, on across the cases)")
    group.add_argument("--guidance-scale", type=float,
                       help="classifier-free guidance scale of sd-inpaint models (default: the "
                            "model's, 3.0; 1 = no guidance)")
    group.add_argument("--negative-prompt", help="sd-inpaint negative prompt (default: the model's, empty)")
    group.add_argument("--seam", type=int, default=3,
                       help="feathered seam around the mask, native px, 0..8: farther out the "
                            "output equals the input exactly (default 3)")
    group.add_argument("--slice-batch", type=int, default=16, help="slices per forward pass")
    group.add_argument("--slice-coherence", default="propagate", choices=("independent", "propagate"),
                       help="volumes: propagate (default; one window for all slices, the centre "
                            "slice first, each next slice started from its generated neighbour "
                            "noised to --strength: on Hippocampus the slice-to-slice statistics "
                            "match real ones, see bench/coherence.py; sequential, so slower) or "
                            "independent (slices generated independently, in batches); 2D images "
                            "are one slice either way")


def _add_model_out(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model folder")
    group.add_argument("--model-out", required=True, metavar="DIR", help="model folder to write")
    group.add_argument("--resume", action="store_true",
                       help="continue an interrupted run from its last checkpoint in DIR/checkpoints")
    group.add_argument("--keep-checkpoints", action="store_true",
                       help="keep DIR/checkpoints after training")


def _add_export_sources(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cases to export")
    group.add_argument("--from", dest="runs", nargs="+", required=True, metavar="RUN_DIR",
                       help="output folders of `meddiffft run`, `sample` or `batch` (their "
                            "manifest.json lists the synthetic pairs)")
    group.add_argument("--real", metavar="TRAIN.CSV",
                       help="CSV with columns image,label of the real cases to put next to them")


def _add_evaluate(commands) -> None:
    evaluate = commands.add_parser(
        "evaluate", help="does synthetic data improve a segmenter? (paired over K-subsets)",
        description="For each seed: draw K labeled training cases, fine-tune and generate through "
                    "`run`, train the same MONAI 2D U-Net on the real cases alone and with the "
                    "synthetic pairs mixed into every batch, and compare test Dice (paired t-test). "
                    "Writes OUT/report.json, report.md and plots; an interrupted run continues.")
    evaluate.add_argument("--train", required=True, metavar="CSV", help="training pool: columns image,label")
    evaluate.add_argument("--test", required=True, metavar="CSV",
                          help="test cases (image,label), disjoint from --train; only used for scoring (the "
                               "report lists those a training image resembles and scores the arms without them)")
    evaluate.add_argument("--out", required=True, metavar="DIR", help="run folder (resumable)")
    evaluate.add_argument("--k", type=int, default=20, help="labeled training cases per seed (default 20)")
    evaluate.add_argument("--synthetic-per-real", type=int, default=2,
                          help="synthetic pairs generated per labeled case (default 2)")
    evaluate.add_argument("--seeds", type=int, default=3,
                          help="seeds, each with its own random K-subset (default 3; --seed is the first)")
    evaluate.add_argument("--validation-cases", type=int, default=10,
                          help="training-pool cases held out per seed for model selection (default 10)")
    evaluate.add_argument("--unlabeled-pool", default="on", choices=("on", "off"),
                          help="give the rest of the training pool, without labels, to the backbone's "
                               "unlabeled pretraining (default on)")
    evaluate.add_argument("--backbone", help="backbone for `run` (default: run's default)")
    evaluate.add_argument("--base-model", metavar="DIR", help="base model for `run` (sd-inpaint backbones)")
    evaluate.add_argument("--train-steps", type=int, help="backbone fine-tune steps (default: run's default)")
    evaluate.add_argument("--run-args", default="", metavar="'ARGS'",
                          help="more options for `run`, in one quoted string (e.g. '--qa-keep 2 --resolution 64')")
    evaluate.add_argument("--arms", default="real_only,real_plus_synthetic",
                          help="comma-separated arms: real_only (strong augmentation), "
                               "real_plus_synthetic, real_no_aug, real_plus_copy_paste (labeled lesions "
                               "pasted into other labeled cases, or with --backgrounds pool into the "
                               "pseudo-labeled pool images, judged by the generation's QA), "
                               "real_plus_pseudo_labels (the pool images the real-only segmenters agree on, "
                               "with their pseudo-labels: self-training, what --backgrounds pool's pairs hold "
                               "before anything is painted), real_plus_pseudo_labels_and_synthetic (those images "
                               "and the synthetic pairs together; beside real_plus_pseudo_labels the report gives "
                               "the generator's share) (default: real_only,real_plus_synthetic)")
    evaluate.add_argument("--backgrounds", default="labeled", metavar="labeled|pool",
                          help="what the synthetic arm's new lesions are painted (the copy-paste arm's pasted) "
                               "into: labeled (default; the K labeled cases) or pool (the unlabeled pool images "
                               "whose lesion the real-only segmenters, --seg-repeats 2 or more, agree on, under "
                               "that pseudo-label; with --old-lesion keep in --run-args it stays beside the new "
                               "lesion, with cover the new lesion is painted over it; a pasted lesion lies at "
                               "its own place, the old one kept)")
    evaluate.add_argument("--seg-epochs", type=int, default=1000,
                          help="segmenter budget in passes over the K cases' slices; the best-validation "
                               "checkpoint is kept (default 1000)")
    evaluate.add_argument("--seg-budget", default="same-steps", metavar="same-steps|same-passes",
                          help="same-steps (default): every arm trains for the steps a mixed arm needs to make "
                               "--seg-epochs passes over the real cases, so a gain is not merely longer "
                               "training; same-passes: each arm makes those passes in its own steps (a mixed "
                               "arm trains longer)")
    evaluate.add_argument("--seg-patience", type=int, default=0,
                          help="stop after this many validations (40 per budget) without gain; 0 = never, "
                               "keep the best-validation checkpoint of the whole budget (default 0: with "
                               "a few validation cases early stopping cut arms short on BUSI)")
    evaluate.add_argument("--seg-repeats", type=int, default=1,
                          help="segmenters trained per arm and seed, each with its own seed; the arm's Dice "
                               "is their mean (on BUSI the segmenter's seed alone moves test Dice by ~2 "
                               "points; default 1)")
    evaluate.add_argument("--seg-batch-size", type=int, default=8, help="segmenter batch size (default 8)")
    evaluate.add_argument("--seg-learning-rate", type=float, default=1e-3, help="segmenter Adam learning rate")
    evaluate.add_argument("--seg-lr-schedule", default="constant", metavar="constant|poly",
                          help="segmenter learning rate over its steps: constant (default) or poly "
                               "(nnU-Net's decay to 0, lr x (1 - step / steps) ** 0.9)")
    evaluate.add_argument("--resolution", type=int, default=128,
                          help="segmenter input side in px (default 128); the backbone's goes in --run-args")
    evaluate.add_argument("--synthetic-fraction", type=float, default=0.5,
                          help="share of each segmenter batch drawn from the extra pairs (default 0.5)")
    evaluate.add_argument("--synthetic-until", type=float, default=1.0,
                          help="share of a mixed arm's steps, the first ones, that draw extra pairs; the "
                               "rest train on the real cases alone, a synthetic-first curriculum (default "
                               "1: mixed throughout; the arm keeps the same passes over the real cases)")
    evaluate.add_argument("--faithful-min-dice", type=float, default=0.0,
                          help="train the synthetic arm only on the pairs whose generated lesion the real-only "
                               "segmenter finds with at least this Dice (0-1; on BUSI it finds nothing in "
                               "a quarter to two thirds of them); default 0: every pair the QA kept")
    _add_common(evaluate)


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
    _add_mask_generator(finetune)
    _add_quality(finetune, reference=True, filtering=False)
    _add_model_out(finetune)
    _add_common(finetune)

    pretrain = commands.add_parser("pretrain", help="pretrain a general inpainter on unlabeled data",
                                   description="Pretrain the compact backbone with random masks on "
                                               "unlabeled images; fine-tune from it with --init-model.")
    _add_slicing(pretrain)
    _add_training(pretrain)
    _add_mask_generator(pretrain)  # accepted like finetune's; without labels nothing is trained
    _add_quality(pretrain, reference=True, filtering=False)
    _add_model_out(pretrain)
    _add_common(pretrain)

    sample = commands.add_parser("sample", help="generate pairs with a model folder",
                                 description="Generate synthetic image+label pairs for each case.")
    sample.add_argument("--model", required=True, metavar="DIR", help="model folder")
    _add_inputs(sample, what="cases to generate from")
    _add_sampling(sample)
    _add_quality(sample, reference=False, filtering=True)
    sample.add_argument("--out", required=True, metavar="DIR", help="output folder")
    _add_common(sample)

    run = commands.add_parser("run", help="fine-tune and sample in one call",
                              description="Fine-tune on the cases, then generate pairs for each; "
                                          "the model is kept in OUT/model.")
    _add_inputs(run, what="cases")
    _add_slicing(run)
    _add_training(run)
    _add_mask_generator(run)
    _add_sampling(run)
    _add_quality(run, reference=True, filtering=True)
    run.add_argument("--paint-into", metavar="CSV",
                     help="cases (image,label) to generate from instead of the fine-tuning cases, "
                          "e.g. unlabeled images whose lesion a segmenter marked (with --old-lesion "
                          "keep it stays under its label, with cover it is painted over); default: the "
                          "fine-tuning cases")
    run.add_argument("--out", required=True, metavar="DIR", help="output folder")
    run.add_argument("--resume", action="store_true",
                     help="keep an interrupted run's work in .OUT.partial next to OUT and continue "
                          "it: the fine-tune resumes from its last checkpoint (same options), "
                          "sampling starts again")
    _add_common(run)

    masks = commands.add_parser("masks", help="draw new lesion masks only (to plan variants)",
                                description="Draw new lesion masks for each case from a model "
                                            "folder's mask generator and write them as labels on "
                                            "the case's grid (mask k of a case is the guide mask "
                                            "that `meddiffft sample` paints as that case's sample "
                                            "k with the same --seed), with "
                                            "manifest.json.")
    masks.add_argument("--model", required=True, metavar="DIR", help="model folder (with mask_generator/)")
    _add_inputs(masks, what="cases")
    group = masks.add_argument_group("masks")
    group.add_argument("--n", type=int, default=4, help="masks per case (default 4)")
    _add_placement(group)
    masks.add_argument("--out", required=True, metavar="DIR", help="output folder")
    _add_common(masks)

    commands.add_parser("batch", parents=[run], add_help=False,  # exactly run's options
                        help="fine-tune once, then generate for every case (resumable; splits the "
                             "cases across `accelerate launch` processes)",
                        description="Fine-tune once on all the cases (OUT/model), then generate for "
                                    "each into OUT/cases/NNNN_<name>/ (a run folder). A restart with "
                                    "the same options skips finished cases; under `accelerate launch "
                                    "-m MedDiffFTLib.cli batch ...` each process takes its share.")

    export = commands.add_parser("export", help="write real + synthetic pairs as an nnU-Net dataset "
                                                "or a MONAI datalist",
                                 description="Collect the pairs of run folders (and real cases) into "
                                             "a training set another tool reads directly.")
    formats = export.add_subparsers(dest="format", required=True, metavar="FORMAT")
    nnunet = formats.add_parser("nnunet", help="an nnU-Net v2 raw dataset",
                                description="Write OUT/DatasetXXX_NAME (imagesTr, labelsTr, "
                                            "dataset.json; label values renumbered 0, 1, 2, ...); "
                                            "meddiffft_cases.json marks the synthetic cases.")
    _add_export_sources(nnunet)
    nnunet.add_argument("--dataset-id", type=int, required=True, metavar="ID",
                        help="nnU-Net dataset id, 1 to 999")
    nnunet.add_argument("--name", required=True, help="dataset name (letters, digits, _ and -)")
    nnunet.add_argument("--out", required=True, metavar="nnUNet_raw",
                        help="the nnU-Net raw data folder to write the dataset into")
    _add_common(nnunet)
    monai = formats.add_parser("monai", help="a MONAI datalist (JSON)",
                               description="Write a datalist {\"training\": [{\"image\", \"label\", "
                                           "\"synthetic\"}]} for monai.data.load_decathlon_datalist; "
                                           "paths are relative to its folder.")
    _add_export_sources(monai)
    monai.add_argument("--out", required=True, metavar="DATALIST.JSON", help="datalist file to write")
    _add_common(monai)

    _add_evaluate(commands)

    demo = commands.add_parser("demo", help="run everything on a generated phantom (CPU, minutes)",
                               description="Make an ultrasound-like phantom, fine-tune the compact "
                                           "backbone on it and generate samples; prints the preview.")
    demo.add_argument("--out", default="meddiffft-demo", metavar="DIR",
                      help="output folder (default: ./meddiffft-demo)")
    demo.add_argument("--train-steps", type=int, default=300,
                      help="optimizer steps of the backbone, the mask generator and the quality "
                           "segmenters (default 300)")
    demo.add_argument("--samples", type=int, default=4, help="samples per phantom (default 4)")
    demo.add_argument("--qa", default="on", choices=("on", "off"),
                      help="quality assessment, as for `run` (default on)")
    _add_common(demo)
    return parser


# ---------------------------------------------------------------------------------------------
# Commands


def _input_pairs(args) -> list[tuple[str, str | None]]:
    """(image, label) paths of --image/--label and the --cases CSV."""
    from .caseio import read_cases_csv

    if len(args.image) != len(args.label):
        raise MedDiffFTError(f"Got {len(args.image)} --image and {len(args.label)} --label options; "
                             "give one --label after each --image.")
    pairs = list(zip(args.image, args.label))
    if args.cases:
        pairs += read_cases_csv(args.cases)
    if not pairs:
        raise MedDiffFTError("No cases given: pass --image IMG --label LABEL (repeatable) or --cases CSV.")
    return pairs


def _read_pair(args, pair: tuple[str, str | None], *, allow_empty: bool = False):
    from .caseio import read_case

    return read_case(pair[0], pair[1], segment=args.segment, resample_label=args.resample_label,
                     allow_empty=allow_empty)


def _read_inputs(args, *, allow_empty: bool = False) -> list:
    return [_read_pair(args, pair, allow_empty=allow_empty) for pair in _input_pairs(args)]


def _read_unlabeled(args) -> list:
    from .caseio import read_case, read_cases_csv

    paths = list(args.unlabeled)
    if args.unlabeled_cases:
        paths += [image for image, _ in read_cases_csv(args.unlabeled_cases)]
    return [read_case(path, None, require_label=False) for path in paths]


def _settings(args):
    from .finetune import settings_from_options

    return settings_from_options(vars(args))


def _sample_settings(args):
    from .corrosion import parse_erode
    from .generate import SampleSettings
    from .masks import check_mask_source

    if args.samples <= 0 or args.sampling_steps <= 0:
        raise MedDiffFTError("--samples and --sampling-steps must be positive.")
    check_mask_source(args.mask_source, **_placement_options(args))
    if args.qa_keep is not None and not (args.qa == "on" and 1 <= args.qa_keep <= args.samples):
        raise MedDiffFTError(f"--qa-keep {args.qa_keep}: keep 1 to --samples ({args.samples}) samples, "
                             "with --qa on.")
    return SampleSettings(samples=args.samples, seed=args.seed, sampling_steps=args.sampling_steps,
                          sampler=args.sampler, init=args.init, strength=args.strength,
                          mask_source=args.mask_source, seam=args.seam, slice_batch=args.slice_batch,
                          guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt,
                          erode=parse_erode(args.erode), erode_changed=args.erode_changed,
                          slice_coherence=args.slice_coherence)


def _prepare_model_out(path: Path, args) -> None:
    from .outputs import check_output_dir

    if args.resume and (path / "checkpoints").is_dir():
        return
    if args.overwrite and path.exists():
        shutil.rmtree(path)
    check_output_dir(path, False, what="--model-out")


def _quality_stage(args, cases: list, progress: Progress) -> Callable[[Path], tuple[str, dict]]:
    """Builds the quality reference (real lesion features, calibrated thresholds, fold
    segmenters) into the model folder; settings are checked now, before training."""
    from dataclasses import asdict

    from .backbone import resolve_device
    from .quality import QualitySettings, build_reference

    settings = QualitySettings(percentile=args.qa_percentile, folds=args.qa_folds,
                               segmenter_steps=args.qa_segmenter_steps,
                               segmenter_resolution=args.qa_segmenter_resolution, seed=args.seed)
    slices_card, device = asdict(_settings(args)[0]), resolve_device(args.device)
    return lambda model_out: ("quality", build_reference(cases, slices_card, settings, model_out=model_out,
                                                         device=device, progress=progress))


def _mask_generator_stage(args, cases: list, progress: Progress) -> Callable[[Path], tuple[str, dict]]:
    """Trains the mask generator on the cases' lesions into the model folder's mask_generator/."""
    from .backbone import resolve_device
    from .mask_generator import FOLDER, MaskTrainSettings, train_mask_generator

    settings = MaskTrainSettings(steps=args.mask_steps, resolution=args.mask_resolution, seed=args.seed)
    device = resolve_device(args.device)
    return lambda model_out: (FOLDER, train_mask_generator(cases, model_out / FOLDER, axis=str(args.axis),
                                                           settings=settings, device=device,
                                                           progress=progress))


def _finetune_stages(args, cases: list, progress: Progress) -> list:
    """The model folder's other parts, trained on the labeled ``cases`` (see finetune_model)."""
    stages = []
    if args.mask_steps != 0:
        stages.append(_mask_generator_stage(args, cases, progress))
    if args.qa == "on":
        stages.append(_quality_stage(args, cases, progress))
    return stages


def _finetune(args, progress: Progress, model_out: Path, cases: list, unlabeled: list, *,
              keep_checkpoints: bool = False) -> dict:
    from .backbone import resolve_device
    from .finetune import finetune_model

    slices, train = _settings(args)
    return finetune_model(cases, model_out=model_out, slices=slices, settings=train,
                          device=resolve_device(args.device), progress=progress, unlabeled=unlabeled,
                          init_model=args.init_model, keep_checkpoints=keep_checkpoints,
                          extra_stages=_finetune_stages(args, cases, progress))


def _sample_into(directory: Path, model_dir: Path, cases: list, args, progress: Progress,
                 recorded_model: Path, first_position: int = 0) -> dict:
    """Generate for every case into ``directory`` (staged); write samples, manifest and preview.
    ``recorded_model`` is the model folder's final path, for the manifest; ``first_position`` is
    the first case's place in the whole list (a batch's cases), where the --background cycle is."""
    from .backbone import load_model, resolve_device
    from .caseio import read_case
    from .generate import generate_samples
    from .masks import make_mask_source
    from .outputs import write_json, write_preview, write_samples

    settings = _sample_settings(args)
    backgrounds = [read_case(path, None, require_label=False) for path in args.background]
    backbone, card, bank = load_model(model_dir, resolve_device(args.device))
    mask_source = make_mask_source(settings.mask_source, model_dir=model_dir, **_placement_options(args),
                                   device=resolve_device(args.device))
    quality = None
    if args.qa == "on":
        from .quality import QualityFilter

        quality = QualityFilter.load(model_dir, card, resolve_device(args.device))
    entries, rejected, first_samples = [], [], []
    for position, case in enumerate(cases, start=first_position):
        turn = position * settings.samples % max(len(backgrounds), 1)  # the cycle goes on across cases
        samples, dropped = generate_samples(backbone, card, bank, case, settings=settings,
                                            progress=progress, backgrounds=backgrounds[turn:] + backgrounds[:turn],
                                            sample_filter=quality, keep_best=args.qa_keep,
                                            mask_source=mask_source)
        for entry in write_samples(directory, samples, case, start=len(entries)):
            entry.update({"backbone": card["backbone"],
                          **backbone.sampling_used(settings.sampler, settings.sampling_steps), "init": settings.init,
                          "strength": settings.strength if settings.init == "transplant" else None,
                          "seam_px": settings.seam})
            entries.append(entry)
        rejected += dropped
        first_samples = first_samples or samples
    if not entries:
        reasons = sorted({str(entry["reason"]).split(":")[0] for entry in rejected})
        raise MedDiffFTError(f"No sample was kept: all {len(rejected)} were rejected ({'; '.join(reasons)}). "
                             "Train longer, ask for more --samples, or relax the option named above "
                             "(--qa off skips quality assessment).")
    qa = quality.summary(entries, rejected, args.qa_keep) if quality else None
    write_json(directory / "manifest.json", {"samples": entries, "rejected": rejected, "qa": qa,
                                             "model": {"path": str(recorded_model), **card}})
    write_preview(directory / "preview.png", cases[0], first_samples, card["slices"]["axis"])
    return {"samples": len(entries), "preview": str(directory / "preview.png")}


def command_finetune(args, progress: Progress) -> dict:
    cases = _read_inputs(args, allow_empty=True)
    unlabeled = _read_unlabeled(args)
    model_out = Path(args.model_out)
    _prepare_model_out(model_out, args)
    _finetune(args, progress, model_out, cases, unlabeled, keep_checkpoints=args.keep_checkpoints)
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
    from .caseio import read_cases_csv
    from .outputs import staged_dir

    cases = _read_inputs(args)
    targets = [_read_pair(args, pair) for pair in read_cases_csv(args.paint_into)] if args.paint_into else cases
    unlabeled = _read_unlabeled(args)
    _sample_settings(args)
    out = Path(args.out)
    with staged_dir(out, args.overwrite, resumable=args.resume) as tmp:
        for leftover in tmp.iterdir():  # a resumed run keeps only the fine-tune's checkpoints
            if leftover.is_dir() and leftover.name != "model":
                shutil.rmtree(leftover)
            elif leftover.is_file():
                leftover.unlink()
        # checkpoints stay until the run succeeds, so an interrupted sampling resumes the fine-tune
        _finetune(args, progress, tmp / "model", cases, unlabeled, keep_checkpoints=args.resume)
        result = _sample_into(tmp, tmp / "model", targets, args, progress, out / "model")
        shutil.rmtree(tmp / "model" / "checkpoints", ignore_errors=True)
    return {"out": str(out), "model": str(out / "model"), **result, "preview": str(out / "preview.png")}


def command_batch(args, progress: Progress) -> dict:
    from .backbone import resolve_device
    from .batch import run_batch

    pairs = _input_pairs(args)
    unlabeled = _read_unlabeled(args)
    _sample_settings(args)
    out = Path(args.out)
    options = {k: v for k, v in vars(args).items()
               if k not in ("image", "label", "cases", "out", "overwrite", "progress", "cancel_file", "device")}

    def finetune(model_dir: Path, cases: list) -> None:
        _finetune(args, progress, model_dir, cases, unlabeled)

    def generate(directory: Path, model_dir: Path, case, position: int) -> None:
        _sample_into(directory, model_dir, [case], args, progress, model_dir, first_position=position)

    last_run = run_batch(pairs, out, options=options, overwrite=args.overwrite,
                         cpu=resolve_device(args.device).type == "cpu", progress=progress,
                         read=lambda pair: _read_pair(args, pair), finetune=finetune, generate=generate)
    return {"out": str(out), "model": str(out / "model"), "cases": len(pairs),
            "generated": len(last_run["generated"]), "skipped": len(last_run["skipped"])}


def command_masks(args, progress: Progress) -> dict:
    import numpy as np

    from .backbone import read_model_card, resolve_device
    from .caseio import output_suffix, write_array
    from .generate import sample_seed
    from .masks import make_mask_source
    from .outputs import staged_dir, write_json
    from .slicing import choose_axis

    card = read_model_card(args.model)
    if args.n <= 0:
        raise MedDiffFTError("--n must be positive.")
    cases = _read_inputs(args)
    source = make_mask_source("generator", model_dir=args.model, **_placement_options(args),
                              device=resolve_device(args.device))
    out = Path(args.out)
    entries = []
    with staged_dir(out, args.overwrite) as tmp, progress.stage("masks", args.n * len(cases)) as advance:
        for case in cases:
            axis = choose_axis(case.spacing, card["slices"]["axis"], case.is_2d)
            for k in range(args.n):
                seed = sample_seed(args.seed, case.image, k)
                proposal = source.propose(case.label, case.foreground, axis, np.random.default_rng(seed), case)
                name = f"mask_{len(entries) + 1:03d}{output_suffix(case, is_label=True)}"
                write_array(case, proposal.label, tmp / name, is_label=True)
                entries.append({"label": name, "seed": seed, "source_image": case.image_path,
                                "source_label": case.label_path, "axis": axis, **proposal.details})
                advance(1)
        write_json(tmp / "manifest.json", {"masks": entries, "model": str(Path(args.model))})
    return {"out": str(out), "model": str(Path(args.model)), "masks": len(entries)}


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
            "--qa", args.qa, "--mask-steps", str(args.train_steps),
            "--qa-segmenter-steps", str(args.train_steps)]  # one budget
    for index in range(4):
        image, mask = ultrasound_phantom(seed=args.seed + index)
        Image.fromarray(image).save(phantom_dir / f"phantom_{index}.png")
        Image.fromarray(mask).save(phantom_dir / f"phantom_{index}_mask.png")
        argv += ["--image", str(phantom_dir / f"phantom_{index}.png"),
                 "--label", str(phantom_dir / f"phantom_{index}_mask.png")]
    result = _dispatch(build_parser().parse_args(argv), progress)
    progress.message(f"Preview: {result['preview']}")
    return {**result, "phantom": str(phantom_dir)}


def command_export(args, progress: Progress) -> dict:
    from .export import gather_cases, write_monai_datalist, write_nnunet_dataset

    cases = gather_cases(args.runs, args.real)
    if args.format == "nnunet":
        out = write_nnunet_dataset(cases, raw_dir=Path(args.out), dataset_id=args.dataset_id,
                                   name=args.name, overwrite=args.overwrite, progress=progress)
    else:
        out = write_monai_datalist(cases, out=Path(args.out), overwrite=args.overwrite)
    synthetic = sum(case.synthetic for case in cases)
    return {"out": str(out), "cases": len(cases), "synthetic": synthetic, "real": len(cases) - synthetic}


def command_evaluate(args, progress: Progress) -> dict:
    import shlex

    from .evaluate import EvaluateSettings, evaluate
    from .segmenter import SegmenterSettings

    run_args = shlex.split(args.run_args)
    for option, value in (("--backbone", args.backbone), ("--base-model", args.base_model),
                          ("--train-steps", args.train_steps)):
        if value is not None:
            run_args += [option, str(value)]
    segmenter = SegmenterSettings(resolution=args.resolution, batch_size=args.seg_batch_size,
                                  learning_rate=args.seg_learning_rate, lr_schedule=args.seg_lr_schedule,
                                  patience=args.seg_patience,
                                  synthetic_fraction=args.synthetic_fraction,
                                  synthetic_until=args.synthetic_until)
    settings = EvaluateSettings(k=args.k, synthetic_per_real=args.synthetic_per_real, seeds=args.seeds,
                                first_seed=args.seed, validation_cases=args.validation_cases,
                                unlabeled_pool=args.unlabeled_pool == "on",
                                arms=[arm.strip() for arm in args.arms.split(",") if arm.strip()],
                                seg_epochs=args.seg_epochs, seg_budget=args.seg_budget,
                                seg_repeats=args.seg_repeats,
                                faithful_min_dice=args.faithful_min_dice, backgrounds=args.backgrounds,
                                segmenter=segmenter,
                                run_args=run_args, device=args.device)
    out = Path(args.out)
    report = evaluate(args.train, args.test, out, settings, progress=progress, overwrite=args.overwrite)
    return {"out": str(out), "report": str(out / "report.json"),
            "delta_dice_mean": report.get("delta_dice_mean"), "paired_p_value": report.get("paired_p_value")}


COMMANDS: dict[str, Callable] = {"finetune": command_finetune, "pretrain": command_pretrain,
                                 "sample": command_sample, "run": command_run, "demo": command_demo,
                                 "export": command_export, "evaluate": command_evaluate,
                                 "batch": command_batch, "masks": command_masks}


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
