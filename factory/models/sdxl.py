"""SDXL pieces shared by the SegGen stages and their training: model configs, tiny models, loading, prompts,
and the models plus denoising loss a training worker uses.

A SegGen model folder (what `factory train text2mask|mask2img` writes to `<output>/final/`) holds only
what training changed, beside the palette it was trained with:

    unet/ (Text2Mask) or controlnet/ (Mask2Img)   save_pretrained folder
    palette.json                                   the colours the model draws / was conditioned on
    seggen.json                                    kind, base model, resolution, steps trained

Everything else (VAE, both text encoders and tokenizers, scheduler) comes from the SDXL base model named
in the spec. The tiny profile builds an SDXL base with diffusers' test-sized configs and random weights,
and tiny Text2Mask / Mask2Img folders in the same layout, so tests load through the real code.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from factory.sources.classes import class_set
from factory.stages.diffusion import SpeedOptions
from factory.models.loading import (fill_once, from_pretrained, is_hub_id, model_cache_dir, resolve_model_path,
                            torch_dtype, write_tiny_clip_tokenizer)
from factory.sources.palettes import Palette
from factory.models.random_weights import PROFILE_HELP, Profile

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
TINY_SDXL = "sdxl-base-v1"
TINY_TEXT2MASK = "seggen-text2mask-v1"
TINY_MASK2IMG = "seggen-mask2img-v1"
MODEL_INFO = "seggen.json"
SUBFOLDER = {"text2mask": "unet", "mask2img": "controlnet"}

Scheduler = Literal["base", "euler_karras", "dpmpp_2m_karras"]


class SDXLModelConfig(BaseModel):
    """The `model` section of the SegGen stages."""

    model_config = ConfigDict(extra="forbid")

    profile: Profile = Field("pretrained", description=PROFILE_HELP)
    base: str = Field(SDXL_BASE, description="SDXL base: hub id, local dir or s3:// URL (VAE, text encoders)")
    weights: str | None = Field(
        None, description="the model folder `factory train` wrote (<output>/final): local dir, s3:// URL or hub id",
    )
    vae: str | None = Field(None, description="optional VAE replacing the base's (e.g. an fp16-safe SDXL VAE)")
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    speed: SpeedOptions = Field(default_factory=SpeedOptions, description="GPU fast paths (docs/gpu.md)")
    storage_options: dict = Field(default_factory=dict, description="fsspec options for object-store URLs")

    @model_validator(mode="after")
    def _pretrained_needs_weights(self):
        if self.profile == "pretrained" and not self.weights:
            raise ValueError("profile pretrained needs `weights`: the final/ folder of `factory train`")
        return self


# ---------------------------------------------------------------- tiny models


def _build_tiny_sdxl(target: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = write_tiny_clip_tokenizer(target)
    # diffusers' SDXL test sizes: two 32-wide text encoders give 64-wide cross-attention, and the
    # added embedding takes 6 time ids x 8 plus the 32-wide pooled text embedding.
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80, cross_attention_dim=64,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, sample_size=128,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    )
    config = CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32,
        vocab_size=1000, max_position_embeddings=77, layer_norm_eps=1e-5, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(config)
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(config)
    # The real SDXL base scheduler.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading",
    )
    StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, add_watermarker=False,
    ).save_pretrained(str(target))


def tiny_sdxl_dir() -> str:
    """Directory of the tiny SDXL base pipeline (random weights), built once per node."""
    return str(fill_once(model_cache_dir() / "tiny" / TINY_SDXL, _build_tiny_sdxl))


def controlnet_from_unet(unet: Any, vae_config: dict) -> Any:
    """A ControlNet initialised from the UNet, its conditioning encoder downsampling as much as the VAE.

    The encoder halves the colour map once per channel step after the first, and must land on the latent
    size: SDXL's VAE (x8) takes diffusers' default (16, 32, 96, 256), the tiny one (x2) (16, 32).
    """
    from diffusers import ControlNetModel

    steps = len(vae_config["block_out_channels"])
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256)[:steps])


def write_model_info(target: Path, kind: str, **info: Any) -> None:
    (Path(target) / MODEL_INFO).write_text(json.dumps({"kind": kind, **info}, indent=1, sort_keys=True))


def _build_tiny_seggen(kind: str):
    def build(target: Path) -> None:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        base = tiny_sdxl_dir()
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
        if kind == "text2mask":
            model = unet
        else:
            model = controlnet_from_unet(unet, AutoencoderKL.load_config(base, subfolder="vae"))
        model.save_pretrained(str(target / SUBFOLDER[kind]))
        Palette.for_classes(class_set("ade150")).save(target)
        write_model_info(target, kind, base=f"tiny:{TINY_SDXL}", steps=0)

    return build


def tiny_seggen_dir(kind: str) -> str:
    """A tiny Text2Mask or Mask2Img model folder (random weights, ADE150 separated palette)."""
    name = TINY_TEXT2MASK if kind == "text2mask" else TINY_MASK2IMG
    return str(fill_once(model_cache_dir() / "tiny" / name, _build_tiny_seggen(kind)))


# ---------------------------------------------------------------- loading


def weights_dir(ref: str, storage_options: dict | None = None) -> str:
    """A local folder holding a SegGen model: local paths as they are, URLs copied, hub ids downloaded."""
    resolved = resolve_model_path(ref, storage_options)
    if not is_hub_id(resolved):
        return resolved
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(resolved)
    except Exception as e:  # offline, unknown repo: the same advice as from_pretrained's
        raise OSError(
            f"cannot fetch SegGen model {ref!r} from the Hugging Face hub ({type(e).__name__}: {e}). Give the "
            "local folder or object-store URL that `factory train` wrote (<output>/final) instead."
        ) from e


def base_ref(model: SDXLModelConfig) -> tuple[str, str]:
    """(name recorded, name loaded) of the SDXL base."""
    if model.profile == "tiny":
        return f"tiny:{TINY_SDXL}", tiny_sdxl_dir()
    return model.base, resolve_model_path(model.base, model.storage_options)


def model_ids(model: SDXLModelConfig, kind: str) -> dict[str, str]:
    if model.profile == "random":
        from factory.models.random_weights import SDXL, SDXL_CONTROLNET, random_id

        return {"base": random_id(SDXL), kind: random_id(SDXL if kind == "text2mask" else SDXL_CONTROLNET)}
    if model.profile == "tiny":
        name = TINY_TEXT2MASK if kind == "text2mask" else TINY_MASK2IMG
        return {"base": f"tiny:{TINY_SDXL}", kind: f"tiny:{name}"}
    ids = {"base": model.base, kind: model.weights}
    if model.vae:
        ids["vae"] = model.vae
    return ids


def load_seggen_pipeline(model: SDXLModelConfig, kind: str, device: str) -> tuple[Any, Palette]:
    """The generation pipeline of a SegGen model on `device`, and the palette stored with it.

    text2mask: StableDiffusionXLPipeline with the fine-tuned UNet; mask2img:
    StableDiffusionXLControlNetPipeline with the trained ControlNet on the frozen base.
    """
    from diffusers import (AutoencoderKL, ControlNetModel, StableDiffusionXLControlNetPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)

    dtype = torch_dtype(model.dtype, device)
    if model.profile == "random":
        return _random_seggen_pipeline(kind, device, dtype), Palette.for_classes(class_set("ade150"))
    base_name, base = base_ref(model)
    if model.profile == "tiny":
        weights_name, folder = f"tiny:{kind}", tiny_seggen_dir(kind)
    else:
        weights_name, folder = model.weights, weights_dir(model.weights, model.storage_options)
    palette = Palette.load(folder)
    extra = {}
    if model.vae:
        extra["vae"] = from_pretrained(AutoencoderKL, model.vae, resolve_model_path(model.vae, model.storage_options),
                                       dtype=dtype)
    if kind == "text2mask":
        unet = from_pretrained(UNet2DConditionModel, weights_name, folder, subfolder="unet", dtype=dtype)
        pipe = from_pretrained(StableDiffusionXLPipeline, base_name, base, unet=unet, dtype=dtype,
                               add_watermarker=False, **extra)
    else:
        controlnet = from_pretrained(ControlNetModel, weights_name, folder, subfolder="controlnet", dtype=dtype)
        pipe = from_pretrained(StableDiffusionXLControlNetPipeline, base_name, base, controlnet=controlnet,
                               dtype=dtype, add_watermarker=False, **extra)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, palette


def _random_seggen_pipeline(kind: str, device: str, dtype) -> Any:
    """The SDXL base with random weights; mask2img adds a full-size SDXL ControlNet (the UNet's encoder)."""
    from diffusers import StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline

    from factory.models import random_weights

    parts = random_weights.pipeline_components(random_weights.SDXL, device, dtype)
    if kind == "text2mask":
        pipe = StableDiffusionXLPipeline(**parts, add_watermarker=False)
    else:
        controlnet = random_weights.diffusers_component(random_weights.SDXL_CONTROLNET, "", device, dtype)
        pipe = StableDiffusionXLControlNetPipeline(**parts, controlnet=controlnet, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def use_scheduler(pipe: Any, name: Scheduler) -> None:
    """Swap the sampler; the Karras ones take the base's noise schedule and space sigmas as in EDM."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if name == "euler_karras":
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    elif name == "dpmpp_2m_karras":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, use_karras_sigmas=True, algorithm_type="dpmsolver++", solver_order=2)


def encode_prompts(tokenizers: list, text_encoders: list, prompts: list[str], device) -> tuple:
    """(prompt_embeds, pooled_embeds) exactly as the SDXL pipelines compute them, for training."""
    import torch

    embeds, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        pooled = out[0]  # the last encoder's projected text embedding
        embeds.append(out.hidden_states[-2])
    return torch.cat(embeds, dim=-1), pooled


# ---------------------------------------------------------------- training


class TrainingModels:
    """The SDXL pieces one training worker uses; `trainable` is the UNet (text2mask) or the ControlNet.

    `model` has `profile`, `base` and `storage_options`; `resume` is a checkpoint folder to start from.
    The frozen parts run in the autocast dtype on GPUs; what is trained stays fp32 for AdamW.
    """

    def __init__(self, kind: str, model: Any, mixed_precision: str, device: Any, resume: Path | None):
        import torch
        from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        self.kind, self.device = kind, device
        amp = mixed_precision if device.type == "cuda" else "no"
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)
        frozen = self.autocast_dtype or torch.float32
        # The SDXL VAE overflows in fp16; it stays fp32 then (bf16 has the range).
        self.vae_dtype = torch.bfloat16 if amp == "bf16" else torch.float32
        ref = {"pretrained": model.base, "tiny": f"tiny:{TINY_SDXL}", "random": "random"}[model.profile]
        base = {"pretrained": lambda: resolve_model_path(ref, model.storage_options), "tiny": tiny_sdxl_dir,
                "random": lambda: None}[model.profile]()
        work = tempfile.TemporaryDirectory()

        def load(cls, folder: str, dtype=None, checkpoint: Path | None = None):
            """A part of the base model, or of the checkpoint folder when one is given."""
            kwargs = {"subfolder": folder} if dtype is None else {"subfolder": folder, "dtype": dtype}
            if checkpoint is not None:
                return from_pretrained(cls, str(checkpoint), str(checkpoint), **kwargs)
            if base is None:  # the random profile: built on the device, from the shipped SDXL configs
                from factory.models import random_weights

                return random_weights.component(random_weights.SDXL, folder, str(device), dtype or torch.float32,
                                               Path(work.name))
            return from_pretrained(cls, ref, base, **kwargs)

        self.tokenizers = [load(CLIPTokenizer, "tokenizer"), load(CLIPTokenizer, "tokenizer_2")]
        self.text_encoders = [load(CLIPTextModel, "text_encoder", frozen),
                              load(CLIPTextModelWithProjection, "text_encoder_2", frozen)]
        self.vae = load(AutoencoderKL, "vae", self.vae_dtype)
        self.noise = DDPMScheduler.from_config(load(DDPMScheduler, "scheduler").config)
        work.cleanup()
        if kind == "text2mask":
            # The trained UNet stays fp32: autocast runs it in half precision, AdamW updates fp32 weights.
            self.unet = self.trainable = load(UNet2DConditionModel, "unet", torch.float32, resume)
        else:
            if resume:
                self.unet = load(UNet2DConditionModel, "unet", frozen)
                self.trainable = load(ControlNetModel, "controlnet", torch.float32, resume)
            elif base is None:  # random weights: nothing to copy, the ControlNet is built from its config
                from factory.models import random_weights

                self.unet = load(UNet2DConditionModel, "unet", frozen)
                self.trainable = random_weights.diffusers_component(random_weights.SDXL_CONTROLNET, "", str(device),
                                                                   torch.float32)
            else:
                # The ControlNet starts as a copy of the UNet's encoder: copy it from fp32 weights, then
                # cast the frozen UNet down, so the trained model does not start from rounded weights.
                self.unet = load(UNet2DConditionModel, "unet", torch.float32)
                self.trainable = controlnet_from_unet(self.unet, self.vae.config).to(torch.float32)
                self.unet.to(frozen)
        for module in [*self.text_encoders, self.vae] + ([self.unet] if kind == "mask2img" else []):
            module.requires_grad_(False)
            module.to(device).eval()
        self.trainable.to(device).train()
        self.scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None

    def autocast(self):
        import torch

        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def loss(self, model: Any, batch: dict, generator: Any) -> Any:
        """Denoising loss of `model` (the trainable, maybe DDP-wrapped) on a batch, noise from `generator`."""
        import torch
        import torch.nn.functional as F

        device = self.device
        with torch.no_grad():
            embeds, pooled = encode_prompts(self.tokenizers, self.text_encoders, batch["prompt"], device)
            # The SDXL pipelines condition an empty negative prompt on zeros (force_zeros_for_empty_prompt):
            # dropped prompts train that same unconditional input.
            empty = torch.tensor([p == "" for p in batch["prompt"]], device=device)
            embeds[empty], pooled[empty] = 0, 0
            pixels = batch["colour" if self.kind == "text2mask" else "image"] * 2 - 1
            latents = self.vae.encode(pixels.to(device, self.vae_dtype)).latent_dist.sample(generator)
            latents = latents.float() * self.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(device)
        steps = torch.randint(0, self.noise.config.num_train_timesteps, (latents.shape[0],), generator=generator)
        steps = steps.to(device)
        noisy = self.noise.add_noise(latents, noise, steps)
        added = {"text_embeds": pooled, "time_ids": batch["time_ids"].to(device)}
        with self.autocast():
            if self.kind == "text2mask":
                pred = model(noisy, steps, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
            else:
                down, mid = model(noisy, steps, encoder_hidden_states=embeds, added_cond_kwargs=added,
                                  controlnet_cond=batch["colour"].to(device), return_dict=False)
                pred = self.unet(noisy, steps, encoder_hidden_states=embeds, added_cond_kwargs=added,
                                 down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        if self.noise.config.prediction_type == "v_prediction":
            target = self.noise.get_velocity(latents, noise, steps)
        else:
            target = noise
        return F.mse_loss(pred.float(), target.float())
