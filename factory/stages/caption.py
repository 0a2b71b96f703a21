"""Caption every real image with BLIP (or BLIP-2): the first step of the Diffusion Synthesis recipe.

The caption goes into `meta["caption"]`, where the prompt stage reads it and the shard json keeps it.
Decoding is greedy (or beam search) and never sampled, so a regenerated shard gets the same captions.
All images of a batch go through one `generate` call: the processor resizes them to the model's input
size, so images of any size share the call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from factory.models.loading import (fill_once, from_pretrained, model_cache_dir, resolve_model_path, tiny_bert_tokenizer,
                            torch_dtype)
from factory.models.random_weights import BLIP, PROFILE_HELP, random_id
from factory.sample import Sample
from factory.stages import Stage, register_stage

TINY_BLIP = "blip-caption-v1"
TINY_BLIP2 = "blip2-caption-v1"
DEFAULT_MODELS = {"blip": "Salesforce/blip-image-captioning-large", "blip2": "Salesforce/blip2-opt-2.7b"}


def _build_tiny_blip(target: Path) -> None:
    import torch
    from transformers import (BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor,
                              BlipTextConfig, BlipVisionConfig)

    # BLIP's decoder starts from a [DEC] bos token and stops at [SEP]: both must be inside the vocabulary,
    # or `generate` indexes past the embedding table.
    tokenizer = tiny_bert_tokenizer(("[DEC]",), bos_token="[DEC]")
    text = BlipTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=64, encoder_hidden_size=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.sep_token_id,
        sep_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    vision = BlipVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                    projection_dim=16))
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    model.save_pretrained(str(target))
    processor.save_pretrained(str(target))


def _build_tiny_blip2(target: Path) -> None:
    import torch
    from transformers import (BlipImageProcessor, Blip2Config, Blip2ForConditionalGeneration, Blip2Processor,
                              Blip2QFormerConfig, Blip2VisionConfig, OPTConfig)

    queries = 4
    tokenizer = tiny_bert_tokenizer(("<image>",), bos_token="[CLS]", eos_token="[SEP]")
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                               tokenizer=tokenizer, num_query_tokens=queries)
    config = Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=32, patch_size=8).to_dict(),
        qformer_config=Blip2QFormerConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, intermediate_size=37,
                                          encoder_hidden_size=32).to_dict(),
        text_config=OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=37, num_hidden_layers=2,
                              num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=64,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id).to_dict(),
        num_query_tokens=queries,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    # A seed whose random language model emits ordinary tokens first: with most seeds it only repeats its
    # bos token, and every tiny caption comes out empty.
    torch.manual_seed(4)
    Blip2ForConditionalGeneration(config).save_pretrained(str(target))
    processor.save_pretrained(str(target))


def _random_captioner(family: str, device: str, dtype):
    """BLIP-large or BLIP-2 OPT-2.7b at full size with random weights, and a processor at the real input
    size with the tiny tokenizer (every id inside the real vocabulary)."""
    from transformers import (Blip2ForConditionalGeneration, Blip2Processor, BlipForConditionalGeneration,
                              BlipProcessor)

    from factory.models import random_weights

    name = random_weights.BLIP[family]
    config = random_weights.transformers_config(name)
    if family == "blip":
        tokenizer = tiny_bert_tokenizer(("[DEC]",), bos_token="[DEC]")
        processor = BlipProcessor(image_processor=random_weights.image_processor(name), tokenizer=tokenizer)
        random_weights.align_special_tokens(config.text_config, tokenizer)
        config.text_config.eos_token_id = tokenizer.sep_token_id
        model = random_weights.transformers_model(BlipForConditionalGeneration, config, device, dtype)
    else:
        tokenizer = tiny_bert_tokenizer(("<image>",), bos_token="[CLS]", eos_token="[SEP]")
        processor = Blip2Processor(image_processor=random_weights.image_processor(name), tokenizer=tokenizer,
                                   num_query_tokens=config.num_query_tokens)
        random_weights.align_special_tokens(config.text_config, tokenizer)
        config.image_token_index = tokenizer.convert_tokens_to_ids("<image>")
        model = random_weights.transformers_model(Blip2ForConditionalGeneration, config, device, dtype)
    return model, processor


class CaptionParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(30, ge=1, description="longest caption, in tokens")
    num_beams: int = Field(1, ge=1, description="1 = greedy decoding; more = beam search (still deterministic)")
    prompt: str | None = Field(
        None, description="text the caption continues (BLIP: kept as the caption's start, e.g. 'a photography "
        "of'; BLIP-2: a question or instruction, not repeated in the caption)",
    )


class CaptionModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    profile: Literal["pretrained", "tiny", "random"] = Field("pretrained", description=PROFILE_HELP)
    family: Literal["blip", "blip2"] = "blip"
    model: str | None = Field(
        None, description="hub id, local dir or s3:// URL; default Salesforce/blip-image-captioning-large "
        "(blip) or Salesforce/blip2-opt-2.7b (blip2)",
    )
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    storage_options: dict = Field(default_factory=dict, description="fsspec options for object-store URLs")


def load_captioner(cfg: CaptionModelConfig, device: str):
    """(model, processor) for the configured family: real or tiny through `from_pretrained`, or random."""
    from transformers import (Blip2ForConditionalGeneration, Blip2Processor, BlipForConditionalGeneration,
                              BlipProcessor)

    model_cls, processor_cls, tiny_name, build = {
        "blip": (BlipForConditionalGeneration, BlipProcessor, TINY_BLIP, _build_tiny_blip),
        "blip2": (Blip2ForConditionalGeneration, Blip2Processor, TINY_BLIP2, _build_tiny_blip2),
    }[cfg.family]
    if cfg.profile == "random":
        model, processor = _random_captioner(cfg.family, device, torch_dtype(cfg.dtype, device))
        return model.to(device).eval(), processor
    if cfg.profile == "tiny":
        ref = path = str(fill_once(model_cache_dir() / "tiny" / tiny_name, build))
    else:
        ref = cfg.model or DEFAULT_MODELS[cfg.family]
        path = resolve_model_path(ref, cfg.storage_options)
    processor = from_pretrained(processor_cls, ref, path)
    model = from_pretrained(model_cls, ref, path, dtype=torch_dtype(cfg.dtype, device))
    return model.to(device).eval(), processor


@register_stage
class CaptionStage(Stage):
    name = "caption"
    uses_gpu = True
    Params = CaptionParams
    Model = CaptionModelConfig

    def setup(self) -> None:
        self.captioner, self.processor = load_captioner(self.model, self.context.device)

    def model_ids(self) -> dict[str, str]:
        if self.model.profile == "tiny":
            return {"captioner": f"tiny:{TINY_BLIP if self.model.family == 'blip' else TINY_BLIP2}"}
        if self.model.profile == "random":
            return {"captioner": random_id(BLIP[self.model.family])}
        return {"captioner": self.model.model or DEFAULT_MODELS[self.model.family]}

    def caption(self, images: list) -> list[str]:
        """One caption per image, from a single batched `generate` call."""
        import torch

        kwargs = {"images": images, "return_tensors": "pt"}
        if self.params.prompt:
            kwargs.update(text=[self.params.prompt] * len(images), padding=True)
        inputs = self.processor(**kwargs).to(self.context.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.captioner.dtype)
        with torch.no_grad():
            ids = self.captioner.generate(
                **inputs, max_new_tokens=self.params.max_new_tokens, num_beams=self.params.num_beams,
                do_sample=False,
            )
        if self.model.family == "blip2" and "input_ids" in inputs:
            # BLIP-2's language model returns the prompt before the answer: keep only the answer.
            ids = ids[:, inputs["input_ids"].shape[1]:]
        return [c.strip() for c in self.processor.batch_decode(ids, skip_special_tokens=True)]

    def process(self, samples: list[Sample]) -> list[Sample]:
        with_image = [s for s in samples if s.image is not None]
        for s in samples:
            if s.image is None:
                s.fail(self.context.label, "no_image", "caption needs an image")
        if with_image:
            for s, text in zip(with_image, self.caption([s.image for s in with_image])):
                s.meta["caption"] = text
        return samples
