"""Text-to-image pipelines for the SENSE recipe: Flux, SD3.5, Sana and SDXL, real or tiny.

Each family names its diffusers pipeline, the text tokenizers it prompts (and how many tokens each
reads), and how the image size must be rounded. The tiny profile builds the same pipeline classes from
small configs with random weights (the sizes diffusers' own tests use), saves them once per node and
loads them back through `from_pretrained`, so the real loading code is what tests run.

Tokenizers for the tiny profile are written at run time from a small vocabulary: CLIP's byte-level BPE
(`write_tiny_clip_tokenizer`), a T5 Unigram over single characters, and a Gemma BPE over characters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from factory.stages.diffusion import unet_size_multiple
from factory.models.loading import (fill_once, from_pretrained, model_cache_dir, resolve_model_path, tiny_gemma_tokenizer,
                            tiny_t5_tokenizer, torch_dtype, write_tiny_clip_tokenizer)

TINY_VERSION = "v1"


@dataclass(frozen=True)
class Family:
    pipeline: str  # diffusers class name
    default_model: str
    # tokenizer attribute -> "clip" (reads model_max_length = 77 tokens) or "long" (reads
    # max_sequence_length tokens: T5 in Flux/SD3, Gemma in Sana)
    tokenizers: dict[str, str]
    steps: int
    guidance: float
    resolution: int
    max_sequence_length: int | None
    dtype_on_gpu: str  # what "auto" means on a GPU: fp16 overflows in Flux/SD3/Sana, bf16 does not
    call_kwargs: dict


FAMILIES: dict[str, Family] = {
    "flux": Family("FluxPipeline", "black-forest-labs/FLUX.1-dev", {"tokenizer": "clip", "tokenizer_2": "long"},
                   28, 3.5, 1024, 512, "bf16", {}),
    "sd3": Family("StableDiffusion3Pipeline", "stabilityai/stable-diffusion-3.5-large",
                  {"tokenizer": "clip", "tokenizer_2": "clip", "tokenizer_3": "long"}, 28, 3.5, 1024, 512, "bf16", {}),
    # Sana's resolution binning would snap every size to its own table; the stage picks sizes itself.
    "sana": Family("SanaPipeline", "Efficient-Large-Model/Sana_1600M_1024px_diffusers", {"tokenizer": "long"},
                   20, 4.5, 1024, 300, "bf16", {"use_resolution_binning": False}),
    "sdxl": Family("StableDiffusionXLPipeline", "stabilityai/stable-diffusion-xl-base-1.0",
                   {"tokenizer": "clip", "tokenizer_2": "clip"}, 30, 5.0, 1024, None, "fp16", {}),
}


def size_multiple(pipe: Any, family: str) -> int:
    """What every image side must divide by: the VAE's downscale times the denoiser's own."""
    vae = pipe.vae_scale_factor
    if family == "flux":
        return vae * 2  # Flux packs latents into 2x2 patches
    if family == "sd3":
        return vae * pipe.transformer.config.patch_size
    if family == "sana":
        return max(32, vae * pipe.transformer.config.patch_size)  # SanaPipeline refuses other sizes
    return unet_size_multiple(pipe)


def prompt_tokens(pipe: Any, family: str, prompt: str, max_sequence_length: int | None) -> dict[str, dict]:
    """Per text tokenizer of the pipeline: tokens in the prompt, tokens it reads, and whether it truncated."""
    out = {}
    for attr, kind in FAMILIES[family].tokenizers.items():
        tokenizer = getattr(pipe, attr)
        limit = tokenizer.model_max_length if kind == "clip" else max_sequence_length
        n = len(tokenizer(prompt, add_special_tokens=True, truncation=False).input_ids)
        out[attr] = {"kind": kind, "tokens": n, "limit": limit, "truncated": n > limit}
    return out


# ---------------------------------------------------------------- tiny builders


def _tiny_t5_encoder(vocab_size: int):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))


def _tiny_clip_encoder(tokenizer, with_projection: bool):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=1000,
        max_position_embeddings=77, projection_dim=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def _tiny_kl_vae(latent_channels: int):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )


def _build_flux(target: Path):
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    clip_tok, t5_tok = write_tiny_clip_tokenizer(target), tiny_t5_tokenizer()
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_kl_vae(1), transformer=transformer,
        text_encoder=_tiny_clip_encoder(clip_tok, False), tokenizer=clip_tok,
        text_encoder_2=_tiny_t5_encoder(len(t5_tok)), tokenizer_2=t5_tok,
    )


def _build_sd3(target: Path):
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    clip_tok, t5_tok = write_tiny_clip_tokenizer(target), tiny_t5_tokenizer()
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    )
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_kl_vae(4), transformer=transformer,
        text_encoder=_tiny_clip_encoder(clip_tok, True), tokenizer=clip_tok,
        text_encoder_2=_tiny_clip_encoder(clip_tok, True), tokenizer_2=write_tiny_clip_tokenizer(target),
        text_encoder_3=_tiny_t5_encoder(len(t5_tok)), tokenizer_3=t5_tok,
    )


def _build_sana(target: Path):
    import torch
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = tiny_gemma_tokenizer()
    vocab = tokenizer.get_vocab()
    torch.manual_seed(0)
    text_encoder = Gemma2Model(Gemma2Config(
        head_dim=16, hidden_size=8, intermediate_size=64, max_position_embeddings=8192, num_attention_heads=2,
        num_hidden_layers=1, num_key_value_heads=2, vocab_size=len(vocab), pad_token_id=0, eos_token_id=1,
        bos_token_id=2,
    ))
    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=32,
    )
    torch.manual_seed(0)
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    return SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))


def _build_sdxl(target: Path):
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    clip_tok = write_tiny_clip_tokenizer(target)
    torch.manual_seed(0)
    # SDXL's layout at test size: cross-attention 64 = the two text encoders' 32 each; the added
    # embedding reads 6 size/crop numbers x 8 plus the 32-wide pooled text embedding.
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=1, projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=1,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, sample_size=128,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=vae, unet=unet, scheduler=scheduler, text_encoder=_tiny_clip_encoder(clip_tok, False), tokenizer=clip_tok,
        text_encoder_2=_tiny_clip_encoder(clip_tok, True), tokenizer_2=write_tiny_clip_tokenizer(target),
    )


_TINY_BUILDERS: dict[str, Callable[[Path], Any]] = {
    "flux": _build_flux, "sd3": _build_sd3, "sana": _build_sana, "sdxl": _build_sdxl,
}


def tiny_id(family: str) -> str:
    return f"t2i-{family}-{TINY_VERSION}"


def tiny_t2i_dir(family: str) -> str:
    """Directory of the tiny pipeline of a family (random weights), built once per node."""
    def fill(target: Path) -> None:
        _TINY_BUILDERS[family](target).save_pretrained(str(target))

    return str(fill_once(model_cache_dir() / "tiny" / tiny_id(family), fill))


# ---------------------------------------------------------------- loading


def load_t2i_pipeline(family: str, ref: str | None, profile: str, dtype_name: str, device: str,
                      storage_options: dict, variant: str | None = None, offload: bool = False):
    """A family's pipeline on `device`: tiny, random (the published architecture), or `ref` (hub id, local
    dir, s3:// URL)."""
    import diffusers

    info = FAMILIES[family]
    cls = getattr(diffusers, info.pipeline)
    if dtype_name == "auto" and device.startswith("cuda"):
        dtype_name = info.dtype_on_gpu
    dtype = torch_dtype(dtype_name, device)
    if profile == "random":
        from factory.models.random_weights import T2I, pipeline_components

        build_on = "cpu" if offload and device.startswith("cuda") else device
        extra = {"add_watermarker": False} if family == "sdxl" else {}
        pipe = cls(**pipeline_components(T2I[family], build_on, dtype), **extra)
        return _placed(pipe, cls, device, offload)
    if profile == "tiny":
        ref = path = tiny_t2i_dir(family)
        variant = None
    else:
        ref = ref or info.default_model
        path = resolve_model_path(ref, storage_options)
    kwargs = {"dtype": dtype}
    if variant:
        kwargs["variant"] = variant
    return _placed(from_pretrained(cls, ref, path, **kwargs), cls, device, offload)


def _placed(pipe: Any, cls: type, device: str, offload: bool):
    if offload and device.startswith("cuda"):
        pipe.enable_model_cpu_offload()  # each component visits the GPU only while it runs
    else:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    # The pipelines log every truncated prompt in full; the stage records truncation in each sample's json.
    logging.getLogger(cls.__module__).setLevel(logging.ERROR)
    return pipe
