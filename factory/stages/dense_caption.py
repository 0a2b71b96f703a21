"""Dense captions (SENSE): a vision-language model writes one long description of every object and its layout.

Any transformers image-text-to-text model loads here (`AutoModelForImageTextToText` + `AutoProcessor`:
Gemma-3, Qwen2.5-VL, LLaVA, Idefics...). The instruction goes through the processor's chat template with
the image, a batch is generated in one greedy `generate` call (left-padded), and the new tokens become
`meta["dense_caption"]` and, by default, the prompt later stages draw from (`meta["prompt"]`).

The tiny profile is a LLaVA (CLIP vision tower + Llama) built from small configs, with a character-level
tokenizer written at run time, so its captions are random printable text.
"""

from __future__ import annotations

from PIL import Image
from pydantic import Field

from factory.models.loading import (
    PROFILE_HELP,
    Dtype,
    ModelConfig,
    Profile,
    from_pretrained,
    resolve_model_path,
    torch_dtype,
)
from factory.models.random_vision import random_vlm
from factory.models.random_weights import VLM, random_id
from factory.models.tiny_vision import TINY_VLM, tiny_vlm_dir
from factory.models.tokenizers import within_vocabulary
from factory.sample import Sample
from factory.schema import StrictModel
from factory.stages import Stage, register_stage

DENSE_PROMPT = (
    "Describe this image in one dense paragraph of about 110 words. Name every visible object, its "
    "colour, size and position, how the objects are arranged relative to each other, the background "
    "and the lighting. Write only the description."
)


class DenseCaptionParams(StrictModel):
    prompt: str = Field(DENSE_PROMPT, min_length=1, description="the instruction given with each image")
    max_new_tokens: int = Field(200, ge=1, description="longest caption, in tokens")
    set_prompt: bool = Field(True, description="also write the caption to meta['prompt'] for later stages")


class DenseCaptionModelConfig(ModelConfig):
    profile: Profile = Field("pretrained", description=PROFILE_HELP + " (Gemma-3-4B)")
    vlm: str = Field("google/gemma-3-4b-it", description="hub id, local dir or s3:// URL of the VLM")
    dtype: Dtype = Field("auto", description="auto: bf16 on GPUs, fp32 on CPU")


@register_stage
class DenseCaptionStage(Stage[DenseCaptionParams, DenseCaptionModelConfig]):
    name = "dense_caption"
    uses_gpu = True
    extra = "models"
    Params = DenseCaptionParams
    Model = DenseCaptionModelConfig

    def setup(self) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        cuda = self.context.device.startswith("cuda")
        # fp16 overflows in Gemma-3 and Qwen-VL activations; bf16 is what these models are released in.
        dtype = torch_dtype("bf16" if self.model.dtype == "auto" and cuda else self.model.dtype, self.context.device)
        if self.model.profile == "random":
            self.vlm, self.processor = random_vlm(self.context.device, dtype)
        else:
            ref = path = tiny_vlm_dir()
            if self.model.profile == "pretrained":
                ref = self.model.vlm
                path = resolve_model_path(ref, self.model.storage_options)
            self.processor = from_pretrained(AutoProcessor, ref, path)
            self.vlm = from_pretrained(AutoModelForImageTextToText, ref, path, dtype=dtype)
        # Left padding: generation appends to the right end of every row of the batch.
        self.processor.tokenizer.padding_side = "left"
        self.vlm = self.vlm.to(self.context.device).eval()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.params.prompt}]}]
        self.text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        tokenizer = self.processor.tokenizer
        self.stop_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
        # Only ids the tokenizer can decode: the random profile's Gemma-3 has 262k ids and a character
        # tokenizer, and would otherwise write captions that decode to nothing.
        self.known_ids = within_vocabulary(len(tokenizer))

    def model_ids(self) -> dict[str, str]:
        return {"vlm": {"tiny": f"tiny:{TINY_VLM}", "random": random_id(VLM)}.get(self.model.profile, self.model.vlm)}

    def process(self, samples: list[Sample]) -> list[Sample]:
        import torch

        images = [Image.fromarray(s.array("image")) for s in samples]
        inputs = self.processor(images=images, text=[self.text] * len(samples), padding=True, return_tensors="pt").to(
            self.context.device
        )
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.vlm.dtype)
        with torch.no_grad():
            out = self.vlm.generate(
                **inputs,
                max_new_tokens=self.params.max_new_tokens,
                do_sample=False,
                logits_processor=self.known_ids,
            )
        new_tokens = out[:, inputs["input_ids"].shape[1] :].tolist()
        for sample, tokens in zip(samples, new_tokens):
            generated = self._until_stop(tokens)
            caption = self.processor.decode(generated, skip_special_tokens=True).strip()
            if not caption:
                sample.fail(self.context.label, "empty_caption", "the model generated no text")
                continue
            sample.meta["dense_caption"] = caption
            sample.meta["dense_caption_tokens"] = len(generated)
            # Cut by max_new_tokens rather than ended by the model: the description may stop mid-sentence.
            sample.meta["dense_caption_truncated"] = len(generated) == len(tokens) == self.params.max_new_tokens
            if self.params.set_prompt:
                sample.meta["prompt"] = caption
        return samples

    def _until_stop(self, tokens: list[int]) -> list[int]:
        for i, t in enumerate(tokens):
            if t in self.stop_ids:
                return tokens[:i]
        return tokens
