"""sd-inpaint benchmark: our default recipe vs the reference recipe on the SD-1.5-inpainting
architecture (random weights, 859.5 M UNet parameters), at equal resolution.

    nice -n 10 python bench/finetune.py [--resolution 256] [--steps 3] [--rounds 1] [--pool 8]

Arms: ``default`` = LoRA + cached latents (a pool of --pool windows encoded once) + autocast
where supported (bf16 on CPUs with AVX512-BF16) + gradient checkpointing, batch 2;
``reference`` = the reference code's recipe (full UNet, fp32, batch 1 x accumulation 2, VAE
encodes every step). Each arm runs in its own child process (for its peak RSS), arms interleaved
(default, reference, default, ...): seconds per optimizer step (median of --steps after one
warm-up step, through the library's training loop), seconds per generated image (ours: 25
DPM-Solver++ steps with CFG under the guiding mask; reference: the plain pipeline call, 50 DDIM
steps, CFG 7.5), peak RSS, trainable parameters and the saved model's size. Prints a table and
the ratios; name the machine when you report them (other processes slow single runs).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SD15_UNET = dict(sample_size=64, in_channels=9, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=768, attention_head_dim=8)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, sample_size=512)


def sd15_components(unet_dtype) -> dict:
    """SD-1.5-inpainting-sized parts with random weights, the UNet made in ``unet_dtype`` as
    ``load_components`` loads it (a byte-level tokenizer stands in for CLIP's vocabulary; text
    length and width are CLIP ViT-L's)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sys.path.insert(0, str(REPO / "Testing"))
    from tiny_sd import byte_vocab

    torch.manual_seed(0)
    vocab, merges = byte_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, steps_offset=1)
    torch.set_default_dtype(unet_dtype or torch.float32)
    unet = UNet2DConditionModel(**SD15_UNET)
    torch.set_default_dtype(torch.float32)
    return {"unet": unet, "vae": AutoencoderKL(**SD15_VAE),
            "text_encoder": text, "tokenizer": tokenizer, "scheduler": scheduler}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_arm(arm: str, resolution: int, steps: int, pool: int, checkpointing: bool | None) -> dict:
    import torch
    from PIL import Image

    from MedDiffFTLib.backbone import InpaintRequest
    from MedDiffFTLib.caseio import read_case
    from MedDiffFTLib.finetune import TrainingWindows, settings_from_options, train
    from MedDiffFTLib.phantom import ultrasound_phantom
    from MedDiffFTLib.progress import Progress
    from MedDiffFTLib.sd_inpaint import SDInpaintBackbone, autocast_dtype

    torch.set_num_threads(torch.get_num_threads())
    folder = Path(tempfile.mkdtemp(prefix="bench-sd-"))
    image, mask = ultrasound_phantom(seed=0, size=resolution)
    Image.fromarray(image).save(folder / "image.png")
    Image.fromarray(mask).save(folder / "mask.png")
    options = {"backbone": "sd-inpaint", "recipe": arm, "base_model": "random SD-1.5 architecture",
               "resolution": resolution, "axis": "auto", "intensity": "auto", "roi": "off", "context": 0.5,
               "scale": "fit", "seed": 0, "checkpoint_every": 10**6, "train_steps": steps + 1,
               "pretrain_steps": None, "latent_pool": pool if arm == "default" else None,
               "gradient_checkpointing": checkpointing if arm == "default" else None}
    slices, settings = settings_from_options(options)
    windows = TrainingWindows([read_case(str(folder / "image.png"), str(folder / "mask.png"))], [], slices,
                              settings.curriculum)
    device = torch.device("cpu")
    started = time.monotonic()
    lora = settings.sd.finetune == "lora"
    components = sd15_components(autocast_dtype(settings.sd.precision, device) if lora else None)
    build_seconds = time.monotonic() - started
    backbone = SDInpaintBackbone.create(settings.sd, resolution=resolution, channels=windows.channels,
                                        device=device, components=components)
    stamps: dict[str, list[float]] = {}

    def record(event: dict) -> None:
        if "stage" in event:
            stamps.setdefault(event["stage"], []).append(time.monotonic())

    started = time.monotonic()
    train(backbone, windows, settings, device=device, checkpoint_dir=None, progress=Progress("none", record))
    step_times = np.diff([started if settings.latent_pool == 0 else stamps["cache latents"][-1],
                          *stamps["finetune"]])
    cache_seconds = (stamps["cache latents"][-1] - started) if settings.latent_pool else 0.0
    train_peak = peak_rss_gb()
    trainable = sum(p.numel() for p in backbone.trainable_parameters())
    with tempfile.TemporaryDirectory() as saved:
        backbone.save_pretrained(Path(saved))
        saved_bytes = sum(p.stat().st_size for p in Path(saved).rglob("*") if p.is_file())
    backbone.unet.requires_grad_(False)
    backbone.to(device)  # as a loaded model: frozen, in the autocast dtype
    region = torch.zeros(1, 1, resolution, resolution)
    region[..., resolution // 4: resolution // 2, resolution // 4: resolution // 2] = 1
    request = InpaintRequest(torch.rand(1, windows.channels, resolution, resolution) * 2 - 1, region, region,
                             [torch.Generator().manual_seed(0)])
    started = time.monotonic()
    backbone.inpaint(request, sampler="dpmsolver++", num_steps=25)
    sample_seconds = time.monotonic() - started
    return {"arm": arm, "resolution": resolution, "seconds_per_step": float(np.median(step_times[1:])),
            "step_times": [round(float(t), 2) for t in step_times], "samples_per_step":
                settings.batch_size * settings.grad_accum, "cache_seconds": round(cache_seconds, 1),
            "pool": settings.latent_pool, "seconds_per_image": sample_seconds,
            "peak_rss_train_gb": train_peak, "peak_rss_gb": peak_rss_gb(), "trainable_parameters": trainable,
            "saved_mb": saved_bytes / 2**20, "unet_parameters": sum(p.numel() for p in backbone.unet.parameters()),
            "precision": settings.sd.precision, "finetune": settings.sd.finetune, "build_seconds": build_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps after one warm-up step")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (default, reference)")
    parser.add_argument("--pool", type=int, default=8, help="windows in the default arm's latent cache")
    parser.add_argument("--arms", default="default,reference")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                        help="the default arm's switch (default: the library's default, on)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_arm(args.child, args.resolution, args.steps, args.pool, args.gradient_checkpointing)))
        return
    results: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for arm in args.arms.split(","):
            done = subprocess.run([sys.executable, __file__, "--child", arm, "--resolution", str(args.resolution),
                                   "--steps", str(args.steps), "--pool", str(args.pool),
                                   *([] if args.gradient_checkpointing is None else
                                     [f"--{'' if args.gradient_checkpointing else 'no-'}gradient-checkpointing"])],
                                  capture_output=True, text=True, cwd=REPO)
            if done.returncode != 0:
                print(f"{arm}: failed (exit {done.returncode}): {done.stderr[-2000:]}", file=sys.stderr)
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps(result), flush=True)
            results.setdefault(arm, []).append(result)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {platform.system()}; "
          f"{args.resolution} px, median over rounds")
    keys = ["seconds_per_step", "samples_per_step", "seconds_per_image", "peak_rss_train_gb", "peak_rss_gb",
            "trainable_parameters", "saved_mb"]
    summary = {arm: {k: float(np.median([r[k] for r in rs])) for k in keys} for arm, rs in results.items()}
    print(f"{'':24s}" + "".join(f"{arm:>16s}" for arm in summary))
    for key in keys:
        print(f"{key:24s}" + "".join(f"{summary[arm][key]:16.4g}" for arm in summary))
    if {"default", "reference"} <= set(summary):
        ours, ref = summary["default"], summary["reference"]
        print(f"\nreference / default: time per optimizer step {ref['seconds_per_step'] / ours['seconds_per_step']:.2f}x, "
              f"per training sample {ref['seconds_per_step'] / ref['samples_per_step'] / (ours['seconds_per_step'] / ours['samples_per_step']):.2f}x, "
              f"per image {ref['seconds_per_image'] / ours['seconds_per_image']:.2f}x; "
              f"peak RSS (training) default / reference {ours['peak_rss_train_gb'] / ref['peak_rss_train_gb']:.2f}; "
              f"trainable parameters {ref['trainable_parameters'] / ours['trainable_parameters']:.0f}x fewer; "
              f"saved model {ref['saved_mb'] / ours['saved_mb']:.0f}x smaller")


if __name__ == "__main__":
    main()
