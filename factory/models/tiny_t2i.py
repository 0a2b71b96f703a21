"""The `tiny` profile of the text-to-image pipelines (Flux, SD3, Sana, SDXL): the real pipeline classes at
diffusers' test sizes, random weights, saved once per node in the model cache and loaded back through
`from_pretrained`. Each builder seeds torch itself: a tiny model is the same on every node."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from factory.models.cache import fill_once, model_cache_dir
from factory.models.tokenizers import tiny_gemma_tokenizer, tiny_t5_tokenizer, write_tiny_clip_tokenizer

TINY_VERSION = "v1"


def tiny_t5_encoder(vocab_size: int):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def tiny_clip_encoder(tokenizer, with_projection: bool):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=1000,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def tiny_kl_vae(latent_channels: int):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def build_tiny_flux(target: Path):
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    clip_tok, t5_tok = write_tiny_clip_tokenizer(target), tiny_t5_tokenizer()
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_kl_vae(1),
        transformer=transformer,
        text_encoder=tiny_clip_encoder(clip_tok, False),
        tokenizer=clip_tok,
        text_encoder_2=tiny_t5_encoder(len(t5_tok)),
        tokenizer_2=t5_tok,
    )


def build_tiny_sd3(target: Path):
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    clip_tok, t5_tok = write_tiny_clip_tokenizer(target), tiny_t5_tokenizer()
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_kl_vae(4),
        transformer=transformer,
        text_encoder=tiny_clip_encoder(clip_tok, True),
        tokenizer=clip_tok,
        text_encoder_2=tiny_clip_encoder(clip_tok, True),
        tokenizer_2=write_tiny_clip_tokenizer(target),
        text_encoder_3=tiny_t5_encoder(len(t5_tok)),
        tokenizer_3=t5_tok,
    )


def build_tiny_sana(target: Path):
    import torch
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = tiny_gemma_tokenizer()
    vocab = tokenizer.get_vocab()
    torch.manual_seed(0)
    text_encoder = Gemma2Model(
        Gemma2Config(
            head_dim=16,
            hidden_size=8,
            intermediate_size=64,
            max_position_embeddings=8192,
            num_attention_heads=2,
            num_hidden_layers=1,
            num_key_value_heads=2,
            vocab_size=len(vocab),
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        )
    )
    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=8,
        sample_size=32,
    )
    torch.manual_seed(0)
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    return SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )


def build_tiny_t2i_sdxl(target: Path):
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    clip_tok = write_tiny_clip_tokenizer(target)
    torch.manual_seed(0)
    # SDXL's layout at test size: cross-attention 64 = the two text encoders' 32 each; the added
    # embedding reads 6 size/crop numbers x 8 plus the 32-wide pooled text embedding.
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=1,
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=1,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=128,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear", timestep_spacing="leading"
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        unet=unet,
        scheduler=scheduler,
        text_encoder=tiny_clip_encoder(clip_tok, False),
        tokenizer=clip_tok,
        text_encoder_2=tiny_clip_encoder(clip_tok, True),
        tokenizer_2=write_tiny_clip_tokenizer(target),
    )


TINY_T2I_BUILDERS: dict[str, Callable[[Path], Any]] = {
    "flux": build_tiny_flux,
    "sd3": build_tiny_sd3,
    "sana": build_tiny_sana,
    "sdxl": build_tiny_t2i_sdxl,
}


def tiny_id(family: str) -> str:
    return f"t2i-{family}-{TINY_VERSION}"


def tiny_t2i_dir(family: str) -> str:
    """Directory of the tiny pipeline of a family (random weights), built once per node."""

    def fill(target: Path) -> None:
        TINY_T2I_BUILDERS[family](target).save_pretrained(str(target))

    return str(fill_once(model_cache_dir() / "tiny" / tiny_id(family), fill))
