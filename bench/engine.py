"""Engine benchmark: speed and memory of the compact backbone, and texture fidelity per sampler/init.

    python bench/engine.py speed                       # s/fine-tune step, s/generated slice, peak RSS at 64/128/256 px
    python bench/engine.py texture --model DIR --cases held_out.csv [--samples 2]

Texture fidelity compares, inside the lesion mask and relative to a ring of tissue around it,
high-frequency energy (mean |image - gaussian(image, 1.5 px)|), local contrast (mean 7x7 standard
deviation) and lesion darkness (mean inside / mean in the ring), for synthetic samples vs the real
lesions of the same held-out images. A ratio of 1.0 = like real. Each configuration runs in a fresh
process for its peak RSS; run on an otherwise idle machine and name it when you report.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import numpy as np


def speed_one(resolution: int, size: str, batch: int) -> dict:
    import torch

    from MedDiffFTLib.backbone import InpaintRequest
    from MedDiffFTLib.compact import CompactBackbone

    torch.manual_seed(0)
    backbone = CompactBackbone.create(resolution=resolution, channels=1, size=size)
    optimizer = torch.optim.AdamW(backbone.trainable_parameters(), lr=1e-4)
    region = torch.zeros(batch, 1, resolution, resolution)
    region[:, :, resolution // 4: 3 * resolution // 4, resolution // 4: 3 * resolution // 4] = 1
    batch_data = {"image": torch.rand(batch, 1, resolution, resolution) * 2 - 1, "region": region,
                  "lesion": region, "lesion_weight": torch.tensor(2.0)}
    times = []
    for step in range(6):
        started = time.perf_counter()
        loss = backbone.training_loss(batch_data, torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    request = InpaintRequest(batch_data["image"][:1], region[:1], region[:1], [torch.Generator().manual_seed(0)])
    backbone.inpaint(request, sampler="dpmsolver++", num_steps=3)  # warm-up
    started = time.perf_counter()
    backbone.inpaint(request, sampler="dpmsolver++", num_steps=25)
    per_slice = time.perf_counter() - started
    return {"resolution": resolution, "model_size": size, "batch": batch,
            "seconds_per_step": float(np.median(times[1:])), "seconds_per_slice_25_steps": per_slice,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "parameters_m": sum(p.numel() for p in backbone.trainable_parameters()) / 1e6}


def texture_stats(image: np.ndarray, mask: np.ndarray) -> dict:
    from scipy import ndimage

    image = image.astype(np.float64)
    ring = ndimage.binary_dilation(mask, iterations=12) & ~ndimage.binary_dilation(mask, iterations=3)
    highpass = np.abs(image - ndimage.gaussian_filter(image, 1.5))
    mean = ndimage.uniform_filter(image, 7)
    local_std = np.sqrt(np.maximum(ndimage.uniform_filter(image ** 2, 7) - mean ** 2, 0))
    inner = ndimage.binary_erosion(mask, iterations=2)
    inner = inner if inner.any() else mask
    return {"hf_energy": highpass[inner].mean() / max(highpass[ring].mean(), 1e-9),
            "local_contrast": local_std[inner].mean() / max(local_std[ring].mean(), 1e-9),
            "darkness": image[inner].mean() / max(image[ring].mean(), 1e-9)}


def texture(args) -> None:
    import torch

    from MedDiffFTLib.backbone import load_model
    from MedDiffFTLib.caseio import read_case, read_cases_csv
    from MedDiffFTLib.generate import SampleSettings, generate_samples
    from MedDiffFTLib.progress import Progress

    backbone, card, bank = load_model(args.model, torch.device("cpu"))
    cases = [read_case(i, l) for i, l in read_cases_csv(args.cases)]

    def plane(array):
        array = array[0]
        return array.mean(axis=-1) if array.ndim == 3 else array

    real = [texture_stats(plane(c.image), c.foreground[0]) for c in cases]
    rows = [("real lesions", real)]
    configs = [("dpmsolver++", "noise"), ("sde-dpmsolver++", "noise"), ("ddpm", "noise"),
               ("dpmsolver++", "transplant"), ("ddpm", "transplant")]
    for sampler, init in configs:
        stats = []
        for case in cases:
            settings = SampleSettings(samples=args.samples, seed=0, sampler=sampler, init=init,
                                      sampling_steps=50 if sampler == "ddpm" else 25)
            samples, _ = generate_samples(backbone, card, bank, case, settings=settings, progress=Progress())
            stats += [texture_stats(plane(s.image), s.foreground[0]) for s in samples]
        rows.append((f"{sampler} / {init}", stats))
    print(f"# texture fidelity, model {args.model}, {len(cases)} held-out images, "
          f"{platform.processor() or platform.machine()}")
    print(f"{'configuration':28s} {'hf_energy':>10s} {'local_contrast':>15s} {'darkness':>9s}  (inside mask / ring; mean ± sd)")
    for name, stats in rows:
        cells = []
        for key in ("hf_energy", "local_contrast", "darkness"):
            values = np.array([s[key] for s in stats])
            cells.append(f"{values.mean():.2f}±{values.std():.2f}")
        print(f"{name:28s} {cells[0]:>10s} {cells[1]:>15s} {cells[2]:>9s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("speed")
    one = sub.add_parser("speed-one")
    one.add_argument("--resolution", type=int)
    one.add_argument("--size")
    one.add_argument("--batch", type=int)
    tex = sub.add_parser("texture")
    tex.add_argument("--model", required=True)
    tex.add_argument("--cases", required=True)
    tex.add_argument("--samples", type=int, default=2)
    args = parser.parse_args()
    if args.command == "speed-one":
        print(json.dumps(speed_one(args.resolution, args.size, args.batch)))
    elif args.command == "speed":
        import os

        print(f"# compact backbone speed on {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs, torch threads default; medians of 5 steps")
        print(f"{'px':>4s} {'size':>6s} {'batch':>5s} {'params M':>8s} {'s/step':>7s} {'s/slice(25)':>11s} {'peak MiB':>8s}")
        for resolution, batch in ((64, 8), (128, 8), (256, 4)):
            out = subprocess.run([sys.executable, __file__, "speed-one", "--resolution", str(resolution),
                                  "--size", "small", "--batch", str(batch)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{r['resolution']:4d} {r['model_size']:>6s} {r['batch']:5d} {r['parameters_m']:8.2f} "
                  f"{r['seconds_per_step']:7.3f} {r['seconds_per_slice_25_steps']:11.3f} {r['peak_rss_mib']:8.0f}")
    else:
        texture(args)


if __name__ == "__main__":
    main()
