"""The `tiny` profile of the vision and language models: captioners, the dense-caption VLM, GroundingDINO,
SAM, CLIP and DINOv2 at test sizes with random weights, saved once per node in the model cache and
loaded back through `from_pretrained` (SAM: its state dict), so tests run the real loading code."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from factory.models.cache import fill_once, model_cache_dir
from factory.models.tokenizers import char_tokenizer, tiny_bert_tokenizer, write_tiny_clip_tokenizer

TINY_BLIP = "blip-caption-v1"


TINY_BLIP2 = "blip2-caption-v1"


def build_tiny_blip(target: Path) -> None:
    import torch
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
        BlipTextConfig,
        BlipVisionConfig,
    )

    # BLIP's decoder starts from a [DEC] bos token and stops at [SEP]: both must be inside the vocabulary,
    # or `generate` indexes past the embedding table.
    tokenizer = tiny_bert_tokenizer(("[DEC]",), bos_token="[DEC]")
    text = BlipTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        encoder_hidden_size=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.sep_token_id,
        sep_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = BlipVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(
        BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    )
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    model.save_pretrained(str(target))
    processor.save_pretrained(str(target))


def build_tiny_blip2(target: Path) -> None:
    import torch
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
    )

    queries = 4
    tokenizer = tiny_bert_tokenizer(("<image>",), bos_token="[CLS]", eos_token="[SEP]")
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        num_query_tokens=queries,
    )
    config = Blip2Config(
        vision_config=Blip2VisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ).to_dict(),
        qformer_config=Blip2QFormerConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            encoder_hidden_size=32,
        ).to_dict(),
        text_config=OPTConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            ffn_dim=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ).to_dict(),
        num_query_tokens=queries,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    # A seed whose random language model emits ordinary tokens first: with most seeds it only repeats its
    # bos token, and every tiny caption comes out empty.
    torch.manual_seed(4)
    Blip2ForConditionalGeneration(config).save_pretrained(str(target))
    processor.save_pretrained(str(target))


TINY_VLM = "dense-caption-llava-v1"


def build_tiny_vlm(target: Path) -> None:
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = char_tokenizer(
        ["<pad>", "<s>", "</s>", "<unk>", "<image>"],
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    vocab = tokenizer.get_vocab()
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>{{ '\\n' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
        "{{ '\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=template,
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=CLIPVisionConfig(
                hidden_size=32,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=2,
                image_size=32,
                patch_size=8,
                projection_dim=32,
            ),
            text_config=LlamaConfig(
                vocab_size=len(vocab),
                hidden_size=32,
                intermediate_size=37,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_hidden_layers=2,
                max_position_embeddings=1024,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
            ),
            image_token_index=vocab["<image>"],
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        )
    )
    model.save_pretrained(str(target))
    processor.save_pretrained(str(target))


def tiny_vlm_dir() -> str:
    return str(fill_once(model_cache_dir() / "tiny" / TINY_VLM, build_tiny_vlm))


TINY_DETECTOR = "grounding-dino-v2"


TINY_SAM = "sam-v1"


def tiny_sam():
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    # segment-anything's own layout (build_sam.py) at test sizes: a 256 px encoder, 16x16 embeddings.
    dim, size, patch = 32, 256, 16
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=2,
            embed_dim=64,
            img_size=size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=2,
            patch_size=patch,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=(1,),
            window_size=4,
            out_chans=dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(size // patch, size // patch),
            input_image_size=(size, size),
            mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


def build_tiny_sam(target: Path) -> None:
    import torch

    torch.manual_seed(0)
    torch.save(tiny_sam().state_dict(), target / "sam_tiny.pth")


def build_tiny_detector(target: Path) -> None:
    import torch
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    tokenizer = tiny_bert_tokenizer()
    backbone = SwinConfig(
        embed_dim=32,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        image_size=64,
        out_features=["stage2", "stage3", "stage4"],
    )
    text = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
    )
    # decoder_layers >= 2: with one layer the box-head weight tying fails at init.
    config = GroundingDinoConfig(
        backbone_config=backbone,
        text_config=text,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=20,
        encoder_n_points=2,
        decoder_n_points=2,
    )
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(config).save_pretrained(str(target))
    processor = GroundingDinoProcessor(
        # 128 px: at 64 px the smallest feature level is 1x1, which GroupNorm cannot normalise alone.
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 128, "longest_edge": 192}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(str(target))


TINY_CLIP = "score-clip-v1"


def build_tiny_clip(target: Path) -> None:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = write_tiny_clip_tokenizer(target)
    torch.manual_seed(0)
    model = CLIPModel(
        CLIPConfig(
            text_config={
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_attention_heads": 4,
                "num_hidden_layers": 2,
                "vocab_size": len(tokenizer),
                "max_position_embeddings": 77,
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            },
            vision_config={
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_attention_heads": 4,
                "num_hidden_layers": 2,
                "image_size": 32,
                "patch_size": 8,
            },
            projection_dim=32,
        )
    )
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    model.save_pretrained(str(target))
    processor.save_pretrained(str(target))


def tiny_clip_dir() -> str:
    return str(fill_once(model_cache_dir() / "tiny" / TINY_CLIP, build_tiny_clip))


TINY_EMBEDDERS = {"clip": "clip-vision-v1", "dinov2": "dinov2-v1"}


def build_tiny_clip_vision(target: Path) -> None:
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=16,
        )
    ).save_pretrained(str(target))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(target))


def build_tiny_dinov2(target: Path) -> None:
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(
        Dinov2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=32, patch_size=8
        )
    ).save_pretrained(str(target))
    BitImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(str(target))
