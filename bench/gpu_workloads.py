"""The benchmark's workloads (bench/bench_gpu.py): each stage alone at real sizes and at tiny ones, the fast
paths over the ControlNet workload, and what the run's plan estimates each from.
"""

from __future__ import annotations

from measure import Workload

ADE_SUBSET = [
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "bed",
    "grass",
    "cabinet",
    "sidewalk",
    "person",
    "earth",
    "door",
    "table",
    "mountain",
    "plant",
    "curtain",
    "chair",
    "car",
]
PROMPT = {"prompt": "a photo of a living room with a grey sofa, a wooden table, a lamp and a window"}


def workloads(tiny: bool) -> list[Workload]:
    """Real sizes (the issue's workloads) on a GPU; the same stages at test sizes with `tiny`."""
    if tiny:
        t = {"profile": "tiny"}
        return [
            Workload("controlnet-sd15-512", "controlnet", t, {"variants": 2, "steps": 2, "resolution": 64}, 2, 1, 64),
            Workload("mask2img-sdxl-1024", "mask2img", t, {"images": 1, "steps": 2, "resolution": 32}, 2, 1, 64),
            Workload("text2mask-sdxl-768", "text2mask", t, {"maps": 2, "steps": 2, "resolution": 32}, 1, 1, 64),
            Workload("caption-blip-large", "caption", t, {"max_new_tokens": 8}, 4, 1, 64),
            Workload("dense-caption-gemma3-4b", "dense_caption", t, {"max_new_tokens": 8}, 2, 1, 64),
            Workload("embed-clip-vit-l14", "select", t, {"check_miou": False, "eps": -1}, 4, 1, 64, synthetic=True),
            Workload("label-gdino-b-sam-h", "maskgen", t, {"mode": "replace", "classes": ADE_SUBSET[:4]}, 2, 1, 64),
            Workload(
                "t2i-flux-dev-1024",
                "t2i",
                t,
                {"generators": [{"name": "flux", "family": "flux", "steps": 2, "resolution": 32}]},
                2,
                1,
                64,
                PROMPT,
            ),
            Workload("score-clip-vit-l14", "score", t, {}, 4, 1, 64, PROMPT, synthetic=True),
        ]
    r = {"profile": "random"}
    return [
        Workload(
            "controlnet-sd15-512",
            "controlnet",
            {**r, "dtype": "fp16"},
            {"variants": 5, "steps": 50, "guidance": 7.5, "resolution": 512},
            2,
            2,
            512,
            note="Diffusion Synthesis defaults: K=5, 50 steps, guidance 7.5; 10 images per call",
            est_tflop_per_call=10 * 111,  # SD1.5 UNet + seg ControlNet, 50 guided steps, VAE: ~111 TFLOP an image
            est_weights_gib=2.5,
        ),
        Workload(
            "mask2img-sdxl-1024",
            "mask2img",
            {**r, "dtype": "bf16"},
            {"images": 1, "steps": 40, "resolution": 1024},
            4,
            2,
            1024,
            note="SDXL ControlNet, 40 steps",
            # SDXL UNet at 128^2 6.76 TFLOP, its ControlNet about half, both guided, 40 steps, VAE 10.5: ~822
            est_tflop_per_call=4 * 822,
            est_weights_gib=9.5,
        ),
        Workload(
            "text2mask-sdxl-768",
            "text2mask",
            {**r, "dtype": "bf16"},
            {"maps": 2, "steps": 200, "resolution": 768},
            1,
            1,
            512,
            note="SDXL, 200 steps",
            est_tflop_per_call=2 * 1526,  # SDXL UNet at 96^2 ~3.8 TFLOP, guided, 200 steps, VAE 768^2 ~5.9
            est_weights_gib=7.0,
        ),
        Workload(
            "caption-blip-large",
            "caption",
            {**r, "family": "blip", "dtype": "fp16"},
            {"max_new_tokens": 30},
            32,
            2,
            512,
            note="BLIP-large, greedy, up to 30 tokens",
            est_tflop_per_call=32 * 0.4,  # ViT-L/16 at 384 px, the text decoder small beside it
            est_weights_gib=0.9,
            est_min_call_s=30 * 0.03,
        ),
        Workload(
            "dense-caption-gemma3-4b",
            "dense_caption",
            r,
            {"max_new_tokens": 200},
            16,
            1,
            512,
            note="Gemma-3-4B-it, bf16, up to 200 new tokens",
            est_tflop_per_call=16 * 7.5,  # SigLIP at 896 px ~3.3, 4.3B parameters over ~490 tokens ~4.2
            est_weights_gib=8.0,
            est_min_call_s=200 * 0.025,
        ),
        Workload(
            "embed-clip-vit-l14",
            "select",
            {**r, "dtype": "fp16"},
            {"check_miou": False, "eps": -1},
            64,
            2,
            512,
            synthetic=True,
            note="select's cosine check: real + synthetic image embedded",
            est_tflop_per_call=64 * 2 * 0.16,  # ViT-L/14 at 224 px, two images a source
            est_weights_gib=0.6,
        ),
        Workload(
            "label-gdino-b-sam-h",
            "maskgen",
            {**r, "dtype": "bf16"},
            # Thresholds 0: random GroundingDINO scores every box near 0.5 or below, and without boxes SAM
            # would never run; 20 boxes an image reach SAM's decoder, about what an ADE20K scene has.
            {"mode": "replace", "classes": ADE_SUBSET, "box_threshold": 0.0, "text_threshold": 0.0, "max_boxes": 20},
            8,
            2,
            512,
            note="GroundingDINO-B (900 queries, 256 text tokens) + SAM ViT-H, 20 class names, 20 boxes an image",
            est_tflop_per_call=8 * 8,  # SAM ViT-H encoder at 1024 px 5.96 TFLOP, GroundingDINO-B ~2
            est_weights_gib=3.5,
        ),
        Workload(
            "t2i-flux-dev-1024",
            "t2i",
            r,
            {"generators": [{"name": "flux", "family": "flux"}]},
            2,
            1,
            512,
            PROMPT,
            note="FLUX.1-dev, 28 steps, guidance 3.5, 1024 px, T5 512 tokens",
            # 11.9B parameters over 4,608 tokens with attention ~125 TFLOP a step, 28 steps, T5-XXL, VAE
            est_tflop_per_call=2 * 3520,
            est_weights_gib=33.0,
        ),
        Workload(
            "score-clip-vit-l14",
            "score",
            {**r, "dtype": "fp16"},
            {},
            64,
            2,
            512,
            PROMPT,
            synthetic=True,
            note="CLIP score + density",
            est_tflop_per_call=64 * 0.18,
            est_weights_gib=0.9,
        ),
    ]


# The plan's estimates (what decides whether a workload starts before the deadline): the FLOPs of a call,
# counted per model on meta tensors (docs/gpu.md gives the sums), at an assumed fraction of the GPU's peak,
# plus building the random weights and moving them to the GPU, plus torch.compile's first call. They order
# nothing and are never reported as measurements.
ASSUMED_MFU = 0.35
BUILD_S, BUILD_GIB_PER_S, COMPILE_S = 10.0, 2.0, 90.0
TRAINING_ESTIMATE_S = 60.0  # one model build, a counted step, three timed steps, a smaller batch after an OOM
RECIPE_ESTIMATE_S = 240.0  # Ray start, every stage's actors loading, eight sources through the stages


def estimate_s(w: Workload, peak: float | None) -> float | None:
    """Seconds a workload is expected to take at real sizes: build, the warm-up and timed calls, compile."""
    if peak is None or w.est_tflop_per_call is None:
        return None
    per_call = max(w.est_tflop_per_call / (ASSUMED_MFU * peak), w.est_min_call_s)
    compiled = bool(w.model.get("speed", {}).get("compile"))
    return round(BUILD_S + w.est_weights_gib / BUILD_GIB_PER_S + (1 + w.calls) * per_call + COMPILE_S * compiled, 1)


# The stage workloads by value: the stages that make each recipe's images first (the goals: ControlNet for
# Diffusion Synthesis, Mask2Img for SegGen ImgSyn, Flux for SENSE), then the others, text2mask's 200 steps last.
VALUE = [
    "controlnet-sd15-512",
    "mask2img-sdxl-1024",
    "t2i-flux-dev-1024",
    "caption-blip-large",
    "embed-clip-vit-l14",
    "score-clip-vit-l14",
    "label-gdino-b-sam-h",
    "dense-caption-gemma3-4b",
    "text2mask-sdxl-768",
]


# The fast paths, each on alone over the ControlNet workload's fp16 baseline (model.speed, model.dtype).
# Compile first: the largest expected gain, and the one most likely to fail on a new torch.
FAST_PATHS = {
    "compile": {"speed": {"compile": ["unet", "controlnet", "vae"]}},
    "compile_cuda_graphs": {"speed": {"compile": ["unet", "controlnet", "vae"], "cuda_graphs": True}},
    "bf16": {"dtype": "bf16"},
    "sdpa_flash": {"speed": {"sdpa": "flash"}},
    "channels_last": {"speed": {"channels_last": True}},
    "vae_batch_2": {"speed": {"vae_batch": 2}},
}
# On a CPU: CUDA graphs need a GPU, and torch.compile is left to the GPU run to keep the tiny run short.
CPU_FAST_PATHS = ("channels_last", "vae_batch_2")
