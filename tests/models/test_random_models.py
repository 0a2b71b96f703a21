"""The random profile: the published architectures from the shipped configs, counted on `meta`, run at full
size where the CPU allows it (SD1.5 + sd-controlnet-seg at 512 px, BLIP-large, CLIP ViT-L/14)."""

import numpy as np
import pytest
import torch

from factory.models import random_weights as rm
from factory.sample import Sample
from factory.sources.classes import class_set
from factory.stages import StageContext, resolve_stage

pytestmark = pytest.mark.timeout(300)

ADE = class_set("ade150")
M = 1e6


def meta_stage(kind: str, model: dict | None = None, params: dict | None = None):
    cls = resolve_stage(kind)
    stage = cls(
        cls.Params(**(params or {})), cls.Model(profile="random", **(model or {})), StageContext(kind, 0, ADE, "meta")
    )
    stage.setup()
    return stage


def millions(module) -> float:
    return rm.count_parameters(module) / M


def test_random_weights_are_drawn_on_the_cpu_whatever_the_default_device():
    """`building(device)` makes the model's device torch's default; the noise the weights are cycled from is
    still drawn on the CPU with a CPU generator (on a CUDA default device a CPU generator raises). `meta`
    stands in for CUDA here: the weights of a CPU tensor filled under it are the ones drawn without it."""
    key = ("cpu", torch.float64)  # a block no other test builds, so this one draws it
    rm._blocks.pop(key, None)
    filled = torch.empty(1000, dtype=torch.float64)
    with torch.device("meta"):
        rm._fill_uniform(filled, -1.0, 1.0)
    noise = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float32) * 2 - 1
    assert rm._blocks.pop(key).device.type == "cpu"
    torch.testing.assert_close(filled, noise.double())


def test_parameter_counts_match_the_published_checkpoints():
    sd15 = rm.pipeline_components(rm.SD15, "meta", torch.float16)
    sdxl = rm.pipeline_components(rm.SDXL, "meta", torch.float16)
    # Exact figures of the public checkpoints (diffusers 0.42, counted on meta: NOTES section 8).
    assert round(millions(sd15["unet"]), 1) == 859.5
    assert round(millions(rm.diffusers_component(rm.SD_CONTROLNET_SEG, "", "meta", torch.float16)), 1) == 361.3
    assert round(millions(sdxl["unet"]), 1) == 2567.5
    assert sd15["tokenizer"].model_max_length == 77 and sd15["text_encoder"].config.vocab_size == 49408
    # Published round figures (model cards), within 1%.
    t2i = {
        family: rm.pipeline_components(name, "meta", torch.bfloat16, skip=("text_encoder", "text_encoder_3"))
        for family, name in rm.T2I.items()
        if family != "sdxl"
    }
    published = {
        "FLUX.1-dev transformer (12B)": (millions(t2i["flux"]["transformer"]), 12000),
        "T5-XXL encoder (4.7B)": (millions(t2i["flux"]["text_encoder_2"]), 4700),
        "SD3.5 Large transformer (8.1B)": (millions(t2i["sd3"]["transformer"]), 8100),
        "Sana 1.6B transformer": (millions(t2i["sana"]["transformer"]), 1600),
        "CLIP ViT-L/14 (428M)": (millions(meta_stage("score").clip), 428),
        "Gemma 3 4B (4.3B)": (millions(meta_stage("dense_caption").vlm), 4300),
        "DINOv2-B (86M)": (
            millions(meta_stage("select", params={"embedding": "dinov2", "check_miou": False}).embedder.model),
            86,
        ),
    }
    for what, (counted, figure) in published.items():
        assert abs(counted - figure) / figure < 0.015, f"{what}: counted {counted:.0f}M"
    # BLIP-2 OPT-2.7b: 3,744.8M unique parameters (3.745B). `count_parameters` counts a shared parameter once,
    # and OPT's LM head is its input embedding (50,304 x 2,560), so this is the figure; 3.87B (3,873.5M) is
    # the one with the tied head counted twice, and "3.8B" is neither.
    blip2 = meta_stage("caption", {"family": "blip2"}).captioner
    assert blip2.get_output_embeddings().weight is blip2.get_input_embeddings().weight
    assert round(millions(blip2), 1) == 3744.8
    head = blip2.get_output_embeddings().weight.numel()
    assert round((rm.count_parameters(blip2) + head) / M, 1) == 3873.5


def test_blip2_has_the_published_vocabulary_and_image_token():
    """Salesforce/blip2-opt-2.7b's published config: 50,304 embedding rows (OPT's 50,272, padded to a
    multiple of 64) and the `<image>` token at id 50265; the random profile's tiny tokenizer stays inside."""
    config = rm.read_config(rm.BLIP["blip2"], "config.json")
    assert config["text_config"]["vocab_size"] == 50304 and config["image_token_index"] == 50265
    assert config["num_query_tokens"] == 32
    stage = meta_stage("caption", {"family": "blip2"})
    model, tokenizer = stage.captioner, stage.processor.tokenizer
    assert model.config.text_config.vocab_size == 50304
    assert tuple(model.get_input_embeddings().weight.shape) == (50304, 2560)
    assert model.get_output_embeddings().weight.shape[0] == 50304
    assert max(tokenizer.get_vocab().values()) < 50304  # every id the tiny tokenizer gives is a real row
    assert model.config.image_token_index == tokenizer.convert_tokens_to_ids("<image>") < 50304


def test_gemma3_scales_the_rope_of_its_global_layers():
    """google/gemma-3-4b-it: `rope_scaling` linear x8 on the global (full-attention) layers, theta 1e6; the
    sliding-window layers keep plain RoPE at `rope_local_base_freq` 10,000."""
    text = rm.read_config(rm.VLM, "config.json")["text_config"]
    assert text["rope_scaling"] == {"factor": 8.0, "rope_type": "linear"}
    vlm = meta_stage("dense_caption").vlm
    rope = vlm.config.text_config.rope_parameters
    assert rope["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}
    assert rope["sliding_attention"] == {"rope_type": "default", "rope_theta": 10_000.0}
    assert vlm.model.language_model.rotary_emb.rope_type == {"full_attention": "linear", "sliding_attention": "default"}
    assert vlm.config.text_config.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]


def test_weight_bytes_count_persistent_buffers_once_at_their_dtype():
    tied = torch.nn.Linear(4, 4, bias=False)
    model = torch.nn.Sequential(tied, torch.nn.Linear(4, 4, bias=False))
    model[1].weight = tied.weight  # shared: counted once
    model.register_buffer("table", torch.zeros(10, dtype=torch.float64))  # persistent: 80 bytes
    model.register_buffer("cache", torch.zeros(1000), persistent=False)  # not in the state_dict: left out
    assert rm.weight_bytes(model) == 16 * 4 + 10 * 8
    sd3 = rm.diffusers_component(rm.T2I["sd3"], "transformer", "meta", torch.bfloat16)
    parameter_bytes = sum(p.numel() * p.element_size() for p in sd3.parameters())
    assert parameter_bytes == 2 * 8_056_627_520
    # SD3.5-large's positional table: a persistent fp32 buffer of 192^2 positions x 2,432 (89.7M values).
    pos_embed = sd3.pos_embed.pos_embed
    assert "pos_embed.pos_embed" in sd3.state_dict() and pos_embed.dtype == torch.float32
    assert pos_embed.numel() == 192 * 192 * 2432 == 89_653_248
    assert rm.weight_bytes(sd3) == parameter_bytes + 4 * 89_653_248 == 16_471_868_032


@pytest.mark.e2e
def test_every_model_stage_builds_its_random_models(model_cache):
    stages = {
        "controlnet": meta_stage("controlnet"),
        "mask2img": meta_stage("mask2img"),
        "text2mask": meta_stage("text2mask"),
        "maskgen": meta_stage("maskgen"),
        "caption": meta_stage("caption"),
    }
    assert stages["controlnet"].model_ids() == {
        "base": "random:stable-diffusion-v1-5",
        "controlnet": "random:sd-controlnet-seg",
    }
    assert type(stages["mask2img"].pipe).__name__ == "StableDiffusionXLControlNetPipeline"
    assert round(millions(stages["mask2img"].pipe.controlnet)) == 1251  # the SDXL UNet's encoder, full size
    assert stages["text2mask"].side == 768 and stages["mask2img"].multiple == 32
    assert stages["controlnet"].multiple == 64  # 8 (VAE) x 8 (three UNet downsamplings)
    detector = stages["maskgen"].generator.detector
    assert detector.config.backbone_config.depths == [2, 2, 18, 2] and detector.config.num_queries == 900
    assert round(millions(stages["maskgen"].generator.predictor.model)) == 641  # SAM ViT-H
    t2i = meta_stage("t2i", params={"generators": [{"name": f, "family": f} for f in ("flux", "sd3", "sana", "sdxl")]})
    assert set(t2i.model_ids().values()) == {f"random:{name}" for name in rm.T2I.values()}
    assert t2i.generation_size(t2i.params.generators[2], 480, 640) == (768, 1024)  # Sana: multiples of 32


@pytest.mark.e2e
def test_the_gemma3_processor_gives_the_real_input_layout():
    from factory.models.random_vision import random_vlm

    vlm, processor = random_vlm("meta", torch.bfloat16)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    inputs = processor(images=[np.zeros((300, 400, 3), np.uint8)], text=[text], return_tensors="pt")
    ids = inputs["input_ids"][0]
    assert inputs["pixel_values"].shape == (1, 3, 896, 896)
    assert int((ids == vlm.config.image_token_id).sum()) == 256  # mm_tokens_per_image
    assert int(ids.max()) < vlm.config.text_config.vocab_size


@pytest.mark.e2e
def test_full_size_sd15_controlnet_one_denoising_step_at_512(model_cache):
    """The real SD1.5 + sd-controlnet-seg sizes built by the stage, one denoising step at 512 px.

    The cheapest honest step: guidance 1.0 switches classifier-free guidance off, so the step is one UNet
    and one ControlNet pass at batch 1 on the 64x64 latent (~1.1 TFLOP). The VAE decoder of a 512 px image
    alone costs 2.5 TFLOP (~20 s on two cores), so the step returns latents, and the full-width decoder
    runs on a 16x16 latent (128 px) instead.
    """
    from PIL import Image

    stage = resolve_stage("controlnet")(
        resolve_stage("controlnet").Params(variants=1, steps=1, guidance=1.0, resolution=512),
        resolve_stage("controlnet").Model(profile="random", dtype="fp32"),
        StageContext("synth", 0, ADE, "cpu"),
    )
    stage.setup()
    assert round(millions(stage.pipe.unet), 1) == 859.5 and round(millions(stage.pipe.controlnet), 1) == 361.3
    mask = np.full((512, 512), ADE.index("wall"), np.uint8)
    mask[:200] = ADE.index("sky")
    source = Sample(shard=0, index=0, source_id="s", mask=mask)
    assert stage.generation_size(*mask.shape) == (512, 512)
    cond = Image.fromarray(np.zeros((512, 512, 3), np.uint8))
    generator = torch.Generator().manual_seed(stage.seed(source.expand(1)[0]))
    latents = stage.pipe(
        prompt=[stage.prompt(source, stage.params.prompt)],
        image=[cond],
        num_inference_steps=1,
        guidance_scale=1.0,
        height=512,
        width=512,
        generator=[generator],
        output_type="latent",
    ).images
    assert latents.shape == (1, 4, 64, 64) and torch.isfinite(latents).all()
    with torch.no_grad():
        image = stage.pipe.vae.decode(latents[:, :, :16, :16] / stage.pipe.vae.config.scaling_factor).sample
    assert image.shape == (1, 3, 128, 128) and torch.isfinite(image).all()


@pytest.mark.e2e
def test_full_size_blip_and_clip_run_on_cpu(model_cache):
    caption = resolve_stage("caption")
    captioner = caption(
        caption.Params(max_new_tokens=3),
        caption.Model(profile="random", dtype="fp32"),
        StageContext("caption", 0, ADE, "cpu"),
    )
    captioner.setup()
    image = np.random.default_rng(0).integers(0, 256, (120, 160, 3), np.uint8)
    [sample] = captioner.process([Sample(shard=0, index=0, source_id="s", image=image)])
    assert sample.ok and isinstance(sample.meta["caption"], str)
    assert captioner.model_ids() == {"captioner": "random:blip-image-captioning-large"}

    select = resolve_stage("select")
    selector = select(
        select.Params(check_miou=False),
        select.Model(profile="random", dtype="fp32"),
        StageContext("select", 0, ADE, "cpu"),
    )
    selector.setup()
    synthetic = Sample(shard=0, index=0, source_id="s", image=image[::-1].copy(), source_image=image)
    [scored] = selector.process([synthetic])
    assert -1 <= scored.meta["scores"]["cosine"] <= 1 and scored.meta["scores"]["embedding"] == "clip"


@pytest.mark.e2e
def test_seggen_training_models_at_full_size():
    from factory.seggen.models import TrainingModels
    from factory.seggen.spec import TrainModel

    for kind, trainable in (("text2mask", 2567.5), ("mask2img", 1251.0)):
        models = TrainingModels(kind, TrainModel(profile="random"), "bf16", torch.device("meta"), None)
        assert round(millions(models.trainable), 1) == trainable
        assert type(models.noise).__name__ == "DDPMScheduler" and models.tokenizers[1].model_max_length == 77
