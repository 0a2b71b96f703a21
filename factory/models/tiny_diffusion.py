"""The `tiny` profile of the diffusion models: the real pipeline classes at diffusers' test sizes, random
weights, saved once per node in the model cache and loaded back through `from_pretrained`, so tests run
the real loading code. Each builder seeds torch itself: a tiny model is the same on every node."""

from __future__ import annotations

from pathlib import Path

from factory.models.cache import fill_once, model_cache_dir
from factory.models.seggen_folder import SUBFOLDER, controlnet_from_unet, write_model_info
from factory.models.tokenizers import write_tiny_clip_tokenizer
from factory.sources.classes import class_set
from factory.sources.palettes import Palette

TINY_CONTROLNET = "controlnet-seg-sd15-v1"


def build_tiny_controlnet(target: Path) -> None:
    import torch
    from diffusers import (
        AutoencoderKL,
        ControlNetModel,
        StableDiffusionControlNetPipeline,
        UNet2DConditionModel,
        UniPCMultistepScheduler,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = write_tiny_clip_tokenizer(target)
    # Same block layout as SD1.5 (cross-attention blocks first), at diffusers' test sizes.
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
    )
    torch.manual_seed(0)
    controlnet = ControlNetModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        in_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        cross_attention_dim=32,
        conditioning_embedding_out_channels=(16, 32),
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=1000,
            max_position_embeddings=77,
            layer_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = UniPCMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    pipe = StableDiffusionControlNetPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        controlnet=controlnet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(target))


def tiny_controlnet_pipeline_dir() -> str:
    """Directory of the tiny seg ControlNet pipeline (random weights), built once per node."""
    return str(fill_once(model_cache_dir() / "tiny" / TINY_CONTROLNET, build_tiny_controlnet))


TINY_SDXL = "sdxl-base-v1"


TINY_TEXT2MASK = "seggen-text2mask-v1"


TINY_MASK2IMG = "seggen-mask2img-v1"


def build_tiny_sdxl(target: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = write_tiny_clip_tokenizer(target)
    # diffusers' SDXL test sizes: two 32-wide text encoders give 64-wide cross-attention, and the
    # added embedding takes 6 time ids x 8 plus the 32-wide pooled text embedding.
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=128,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    )
    config = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        projection_dim=32,
        vocab_size=1000,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(config)
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(config)
    # The real SDXL base scheduler.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
    )
    StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    ).save_pretrained(str(target))


def tiny_sdxl_dir() -> str:
    """Directory of the tiny SDXL base pipeline (random weights), built once per node."""
    return str(fill_once(model_cache_dir() / "tiny" / TINY_SDXL, build_tiny_sdxl))


def build_tiny_seggen(kind: str):
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
    return str(fill_once(model_cache_dir() / "tiny" / name, build_tiny_seggen(kind)))
