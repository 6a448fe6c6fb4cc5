"""A tiny random Stable-Diffusion inpainting pipeline (9-channel UNet, x8 VAE, 2-layer CLIP text
encoder, in-memory tokenizer), saved to a folder like a real checkpoint: the sd-inpaint backbone's
offline stand-in for `stable-diffusion-v1-5/stable-diffusion-inpainting` (stack.md "Tiny offline
models")."""

from __future__ import annotations

from pathlib import Path

import torch


def byte_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A valid CLIP BPE vocabulary without files: the 256 GPT-2 byte characters, the same with
    ``</w>``, a few merges, then the start/end tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges = [("h", "t"), ("ht", "a</w>"), ("p", "h"), ("o", "f</w>")]
    tokens += [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def tiny_pipeline(*, in_channels: int = 9, seed: int = 0):
    """The assembled ``StableDiffusionInpaintPipeline`` with random weights."""
    from diffusers import (AutoencoderKL, PNDMScheduler, StableDiffusionInpaintPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=16)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=16, sample_size=64)
    vocab, merges = byte_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1)
    return StableDiffusionInpaintPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                          unet=unet, scheduler=scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)


def save_tiny_sd(directory: Path, *, in_channels: int = 9, seed: int = 0) -> Path:
    """Write the tiny pipeline to ``directory`` (safetensors weights) and return it."""
    tiny_pipeline(in_channels=in_channels, seed=seed).save_pretrained(directory, safe_serialization=True)
    return directory
