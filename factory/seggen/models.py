"""The SDXL pieces a SegGen training worker uses, and the denoising loss it minimises."""

from __future__ import annotations

import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from factory.models.loading import from_pretrained, resolve_model_path
from factory.models.seggen_folder import controlnet_from_unet
from factory.models.tiny_diffusion import TINY_SDXL, tiny_sdxl_dir


def encode_prompts(tokenizers: list, text_encoders: list, prompts: list[str], device) -> tuple:
    """(prompt_embeds, pooled_embeds) exactly as the SDXL pipelines compute them, for training."""
    import torch

    embeds, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        pooled = out[0]  # the last encoder's projected text embedding
        embeds.append(out.hidden_states[-2])
    return torch.cat(embeds, dim=-1), pooled


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
        base = {
            "pretrained": lambda: resolve_model_path(ref, model.storage_options),
            "tiny": tiny_sdxl_dir,
            "random": lambda: None,
        }[model.profile]()
        work = tempfile.TemporaryDirectory()

        def load(cls, folder: str, dtype=None, checkpoint: Path | None = None):
            """A part of the base model, or of the checkpoint folder when one is given."""
            kwargs = {"subfolder": folder} if dtype is None else {"subfolder": folder, "dtype": dtype}
            if checkpoint is not None:
                return from_pretrained(cls, str(checkpoint), str(checkpoint), **kwargs)
            if base is None:  # the random profile: built on the device, from the shipped SDXL configs
                from factory.models import random_weights

                return random_weights.component(
                    random_weights.SDXL, folder, str(device), dtype or torch.float32, Path(work.name)
                )
            return from_pretrained(cls, ref, base, **kwargs)

        self.tokenizers = [load(CLIPTokenizer, "tokenizer"), load(CLIPTokenizer, "tokenizer_2")]
        self.text_encoders = [
            load(CLIPTextModel, "text_encoder", frozen),
            load(CLIPTextModelWithProjection, "text_encoder_2", frozen),
        ]
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
                self.trainable = random_weights.diffusers_component(
                    random_weights.SDXL_CONTROLNET, "", str(device), torch.float32
                )
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
        # Drawn on the CPU, where the generator lives, whatever the default device: the same noise on any device.
        noise = torch.randn(latents.shape, generator=generator, device="cpu").to(device)
        steps = torch.randint(
            0, self.noise.config.num_train_timesteps, (latents.shape[0],), generator=generator, device="cpu"
        )
        steps = steps.to(device)
        noisy = self.noise.add_noise(latents, noise, steps)
        added = {"text_embeds": pooled, "time_ids": batch["time_ids"].to(device)}
        with self.autocast():
            if self.kind == "text2mask":
                pred = model(noisy, steps, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
            else:
                down, mid = model(
                    noisy,
                    steps,
                    encoder_hidden_states=embeds,
                    added_cond_kwargs=added,
                    controlnet_cond=batch["colour"].to(device),
                    return_dict=False,
                )
                pred = self.unet(
                    noisy,
                    steps,
                    encoder_hidden_states=embeds,
                    added_cond_kwargs=added,
                    down_block_additional_residuals=down,
                    mid_block_additional_residual=mid,
                ).sample
        if self.noise.config.prediction_type == "v_prediction":
            target = self.noise.get_velocity(latents, noise, steps)
        else:
            target = noise
        return F.mse_loss(pred.float(), target.float())
