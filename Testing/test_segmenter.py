"""The fixed downstream segmenter: input conversion, Dice against MONAI, the batched augmentation,
determinism, validation-based model selection, synthetic mixing and bad settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from MedDiffFTLib.errors import MedDiffFTError
from MedDiffFTLib.segmenter import (SegmenterSettings, augment, dice_per_image, hd95_per_image, planes_to_tensor,
                                    predict, train_segmenter)

CPU = torch.device("cpu")


def blob_planes(count: int, seed: int = 0, shape=(40, 46)) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Noisy planes with one dark disc each (the lesion) at a random place."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    images, masks = [], []
    for _ in range(count):
        cy, cx = rng.integers(12, 28, 2)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < 40).astype(np.uint8)
        images.append(100 + 20 * rng.standard_normal(shape) - 60 * mask)
        masks.append(mask)
    return images, masks


def blob_tensors(count: int, seed: int = 0, resolution: int = 32):
    images, masks = blob_planes(count, seed)
    return planes_to_tensor(images, resolution), planes_to_tensor(masks, resolution, is_mask=True)


def test_augment_is_seeded_and_keeps_image_and_mask_aligned():
    _, masks = blob_tensors(64, resolution=48)
    images = masks.clone()  # the image is its mask: any spatial change must move both alike
    out_images, out_masks = augment(images, masks, torch.Generator().manual_seed(1))
    again_images, again_masks = augment(images, masks, torch.Generator().manual_seed(1))
    assert torch.equal(out_images, again_images) and torch.equal(out_masks, again_masks)
    other_images, _ = augment(images, masks, torch.Generator().manual_seed(2))
    assert not torch.equal(out_images, other_images)
    assert out_masks.shape == masks.shape and out_masks.unique().tolist() == [0.0, 1.0]
    moved = (out_masks != masks).flatten(1).any(1)
    assert 0.5 < float(moved.float().mean()) < 1.0  # flips alone change 3 of 4; the rest sometimes
    low = out_images.amin((1, 2, 3), keepdim=True)
    high = out_images.amax((1, 2, 3), keepdim=True)
    thresholded = (out_images - low) / (high - low) > 0.5  # intensity changes are monotonic or small
    assert dice_per_image(thresholded, out_masks).min() > 0.85


def test_planes_to_tensor_normalizes_greys_and_binarizes_masks():
    ramp = np.tile(np.arange(16, dtype=np.float64), (16, 1))
    colour = np.stack([ramp, ramp + 10, ramp + 20], axis=-1)
    images = planes_to_tensor([ramp, colour], 16)
    assert images.shape == (2, 1, 16, 16) and images.dtype == torch.float32
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0
    assert torch.allclose(images[0], images[1])  # colour -> grey mean, then the same normalization
    mask = np.zeros((8, 8), np.uint8)
    mask[:, :5] = 7  # 5/8 of each row, any label value
    resized = planes_to_tensor([mask], 4, is_mask=True)
    assert resized.unique().tolist() == [0.0, 1.0]
    assert resized[0, 0].tolist() == [[1.0, 1.0, 0.0, 0.0]] * 4  # the third pixel is half covered: background


def test_planes_to_tensor_rejects_volumes():
    with pytest.raises(MedDiffFTError, match=r"A slice has shape \(2, 3, 4, 5\); the segmenter takes 2D planes"):
        planes_to_tensor([np.zeros((2, 3, 4, 5))], 8)


def test_dice_matches_hand_values_and_monai_dice_metric():
    from monai.metrics import DiceMetric

    prediction = torch.zeros(4, 1, 4, 4, dtype=torch.bool)
    target = torch.zeros(4, 1, 4, 4, dtype=torch.bool)
    prediction[0, 0, :2, :2] = True                     # 4 px vs 2 px inside: 2*2/(4+2)
    target[0, 0, :2, :1] = True
    prediction[1, 0, 0, 0] = True                       # disjoint: 0
    target[1, 0, 3, 3] = True
    target[2, 0, 1, 1] = True                           # missed lesion: 0; image 3: both empty: 1
    dice = dice_per_image(prediction, target)
    assert dice.tolist() == pytest.approx([2 / 3, 0.0, 0.0, 1.0])
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    metric(prediction.float(), target.float())
    assert dice.tolist() == pytest.approx(metric.aggregate().reshape(-1).tolist())


def test_hd95_is_defined_only_when_both_sides_hold_foreground():
    prediction = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    target = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    prediction[0, 0, 2, 2] = True
    target[0, 0, 2, 5] = True
    target[1, 0, 2, 5] = True
    hd95 = hd95_per_image(prediction, target)
    assert hd95[0] == pytest.approx(3.0) and np.isnan(hd95[1])


def test_training_is_deterministic_and_keeps_the_best_validation_weights():
    images, masks = blob_tensors(10)
    settings = SegmenterSettings(resolution=32, max_steps=40, batch_size=4, validate_every=10, patience=0,
                                 learning_rate=3e-3, seed=3)
    validation = (images[6:], masks[6:])
    model, history = train_segmenter(images[:6], masks[:6], settings, device=CPU, validation=validation)
    again, history_again = train_segmenter(images[:6], masks[:6], settings, device=CPU, validation=validation)
    assert history == history_again
    assert torch.equal(predict(model, images), predict(again, images))
    assert len(history["loss"]) == 40 and [s for s, _ in history["val_dice"]] == [10, 20, 30, 40]
    best_step, best_dice = max(history["val_dice"], key=lambda item: item[1])
    assert history["best_step"] == best_step
    assert dice_per_image(predict(model, validation[0]), validation[1]).mean() == pytest.approx(best_dice)
    other, other_history = train_segmenter(images[:6], masks[:6], SegmenterSettings(
        **{**settings.__dict__, "seed": 4}), device=CPU, validation=validation)
    assert other_history["loss"] != history["loss"]


def test_training_learns_blobs_and_stops_early_without_improvement():
    images, masks = blob_tensors(12)
    settings = SegmenterSettings(resolution=32, max_steps=150, batch_size=4, validate_every=25,
                                 augmentation="none", learning_rate=3e-3)
    model, history = train_segmenter(images[:8], masks[:8], settings, device=CPU,
                                     validation=(images[8:], masks[8:]))
    assert dice_per_image(predict(model, images[8:]), masks[8:]).mean() > 0.8
    flat = SegmenterSettings(resolution=32, max_steps=100, batch_size=2, validate_every=5, patience=2,
                             learning_rate=0.0)
    _, stopped = train_segmenter(images[:4], masks[:4], flat, device=CPU, validation=(images[8:], masks[8:]))
    steps = [s for s, _ in stopped["val_dice"]]
    best = max(stopped["val_dice"], key=lambda item: item[1])
    assert stopped["best_step"] == best[0] and steps[-3:-2] == [best[0]]  # 2 validations without gain
    assert len(stopped["loss"]) == steps[-1] < 100


def test_synthetic_pairs_enter_every_batch_at_the_given_share():
    images, masks = blob_tensors(6)
    synthetic = blob_tensors(6, seed=1)
    settings = SegmenterSettings(resolution=32, max_steps=3, batch_size=4, augmentation="none")
    _, real_only = train_segmenter(images, masks, settings, device=CPU)
    _, mixed = train_segmenter(images, masks, settings, device=CPU, synthetic=synthetic)
    _, none_used = train_segmenter(images, masks, SegmenterSettings(**{**settings.__dict__,
                                                                      "synthetic_fraction": 0.0}),
                                   device=CPU, synthetic=synthetic)
    assert mixed["loss"] != real_only["loss"]
    assert none_used["loss"] == real_only["loss"] and real_only["best_step"] is None


def test_a_synthetic_first_curriculum_mixes_only_the_first_steps():
    images, masks = blob_tensors(6)
    synthetic = blob_tensors(6, seed=1)
    settings = SegmenterSettings(resolution=32, max_steps=3, batch_size=4, augmentation="none")
    _, mixed = train_segmenter(images, masks, settings, device=CPU, synthetic=synthetic)
    _, real_only = train_segmenter(images, masks, settings, device=CPU)

    def curriculum(until: float) -> list[float]:
        scheduled = SegmenterSettings(**{**settings.__dict__, "synthetic_until": until})
        _, history = train_segmenter(images, masks, scheduled, device=CPU, synthetic=synthetic)
        return history["loss"]

    first_two = curriculum(0.5)  # ceil(1.5) = 2 mixed steps, then real only
    assert first_two[:2] == mixed["loss"][:2] and first_two[2] != mixed["loss"][2]
    assert curriculum(0.0) == real_only["loss"]


def test_the_poly_schedule_decays_the_learning_rate_after_the_first_step():
    images, masks = blob_tensors(4)
    settings = SegmenterSettings(resolution=32, max_steps=4, batch_size=2, augmentation="none")
    _, constant = train_segmenter(images, masks, settings, device=CPU)
    _, poly = train_segmenter(images, masks, SegmenterSettings(**{**settings.__dict__, "lr_schedule": "poly"}),
                              device=CPU)
    # step 1 updates at the full rate in both (step 2's loss is equal); step 2 at a lower one
    assert poly["loss"][:2] == constant["loss"][:2] and poly["loss"][2] != constant["loss"][2]


@pytest.mark.parametrize("change, message", [
    ({"lr_schedule": "cosine"}, r"Unknown segmenter learning-rate schedule 'cosine'; use one of constant, poly"),
    ({"synthetic_fraction": 1.0}, r"The synthetic fraction must be in \[0, 1\); got 1.0"),
    ({"synthetic_until": 1.5}, r"The synthetic share of the steps must be in \[0, 1\]; got 1.5"),
    ({"augmentation": "heavy"}, r"Unknown segmenter augmentation 'heavy'; use one of strong, none"),
])
def test_bad_settings_are_refused(change, message):
    images, masks = blob_tensors(2)
    with pytest.raises(MedDiffFTError, match=message):
        train_segmenter(images, masks, SegmenterSettings(resolution=32, max_steps=1, **change), device=CPU)


def test_mismatched_tensors_are_refused():
    images, masks = blob_tensors(2)
    with pytest.raises(MedDiffFTError, match=r"The segmenter's training images and masks must both be "
                                             r"\(N, 1, R, R\)"):
        train_segmenter(images, masks[:1], SegmenterSettings(resolution=32, max_steps=1), device=CPU)
