"""The `random` profile of the vision and language models: the published architectures (configs shipped in
`factory/data/model_configs`) with random weights, built on their device, with processors at the real
input sizes and the tiny tokenizers (every id inside the real vocabulary). For benchmarks and memory
planning; see `factory.models.random_weights`."""

from __future__ import annotations

from pathlib import Path

from factory.models.random_weights import GROUNDING_DINO, VLM
from factory.models.tokenizers import char_tokenizer, tiny_bert_tokenizer, write_tiny_clip_tokenizer


def random_captioner(family: str, device: str, dtype):
    """BLIP-large or BLIP-2 OPT-2.7b at full size with random weights, and a processor at the real input
    size with the tiny tokenizer (every id inside the real vocabulary)."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor, BlipForConditionalGeneration, BlipProcessor

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
        processor = Blip2Processor(
            image_processor=random_weights.image_processor(name),
            tokenizer=tokenizer,
            num_query_tokens=config.num_query_tokens,
        )
        random_weights.align_special_tokens(config.text_config, tokenizer)
        config.image_token_index = tokenizer.convert_tokens_to_ids("<image>")
        model = random_weights.transformers_model(Blip2ForConditionalGeneration, config, device, dtype)
    return model, processor


def random_vlm(device: str, dtype):
    """Gemma-3-4B-it at full size with random weights; its processor at the real 896 px with 256 image
    tokens and a character tokenizer (ids inside the real vocabulary, special ids set in the config)."""
    from transformers import Gemma3ForConditionalGeneration, Gemma3Processor

    from factory.models import random_weights

    tokenizer = char_tokenizer(
        [
            "<pad>",
            "<eos>",
            "<bos>",
            "<unk>",
            "<start_of_image>",
            "<end_of_image>",
            "<image_soft_token>",
            "<start_of_turn>",
            "<end_of_turn>",
        ],
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    template = (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>user\n{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
        "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    config = random_weights.transformers_config(VLM)
    processor = Gemma3Processor(
        image_processor=random_weights.image_processor(VLM),
        tokenizer=tokenizer,
        chat_template=template,
        image_seq_length=config.mm_tokens_per_image,
    )
    ids = tokenizer.convert_tokens_to_ids
    config.boi_token_index, config.eoi_token_index = ids("<start_of_image>"), ids("<end_of_image>")
    config.image_token_index = ids("<image_soft_token>")
    random_weights.align_special_tokens(config.text_config, tokenizer)
    return random_weights.transformers_model(Gemma3ForConditionalGeneration, config, device, dtype), processor


def random_detector(device: str, dtype):
    """GroundingDINO-B (Swin-B, BERT-base) with random weights; its processor at the real 800-1333 px."""
    from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

    from factory.models import random_weights

    tokenizer = tiny_bert_tokenizer()
    config = random_weights.transformers_config(GROUNDING_DINO)
    random_weights.align_special_tokens(config.text_config, tokenizer)
    processor = GroundingDinoProcessor(
        image_processor=random_weights.image_processor(GROUNDING_DINO), tokenizer=tokenizer
    )
    return random_weights.transformers_model(GroundingDinoForObjectDetection, config, device, dtype), processor


def random_clip(device: str, dtype):
    """CLIP ViT-L/14 (both towers) at full size with random weights, and the tiny CLIP tokenizer."""
    import tempfile

    from transformers import CLIPModel, CLIPProcessor

    from factory.models import random_weights

    with tempfile.TemporaryDirectory() as work:
        tokenizer = write_tiny_clip_tokenizer(Path(work))
    config = random_weights.transformers_config(random_weights.CLIP_L)
    random_weights.align_special_tokens(config.text_config, tokenizer)
    processor = CLIPProcessor(
        image_processor=random_weights.image_processor(random_weights.CLIP_L), tokenizer=tokenizer
    )
    return random_weights.transformers_model(CLIPModel, config, device, dtype), processor


def random_embedder(kind: str, device: str, dtype):
    """(processor, model) of CLIP ViT-L/14's vision tower or DINOv2-base, at full size with random weights."""
    from transformers import CLIPVisionModelWithProjection, Dinov2Model

    from factory.models import random_weights

    name = random_weights.CLIP_L if kind == "clip" else random_weights.DINOV2
    config = random_weights.transformers_config(name)
    if kind == "clip":
        config.vision_config.projection_dim = config.projection_dim
        model = random_weights.transformers_model(CLIPVisionModelWithProjection, config.vision_config, device, dtype)
    else:
        model = random_weights.transformers_model(Dinov2Model, config, device, dtype)
    return random_weights.image_processor(name), model
