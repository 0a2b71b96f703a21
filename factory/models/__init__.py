"""Model loading, and the two profiles that need no download.

loading.py         hub ids, local paths, object-store URLs; the `model` section every model stage has; dtypes
weights.py         pinned and verified weights: a hub commit, a file's sha256, an object's ETag
cache.py           the node-local model cache: entries filled once per node, file hashes once per file state
tokenizers.py      tokenizers built from small vocabularies
tiny_diffusion.py  the `tiny` profile of the ControlNet and SegGen (SDXL) pipelines
tiny_t2i.py        the `tiny` profile of the text-to-image pipelines (Flux, SD3, Sana, SDXL)
tiny_vision.py     the `tiny` profile of the captioners, VLM, detector, SAM, CLIP, DINOv2
random_weights.py  the `random` profile: published architectures from shipped configs, random weights
random_vision.py   the `random` profile of the vision and language models
controlnet.py      the SD1.5 seg ControlNet pipeline
sdxl.py            the SegGen pipelines on SDXL (Text2Mask, Mask2Img)
seggen_folder.py   the layout of a SegGen model folder
t2i.py             the text-to-image families of SENSE (Flux, SD3.5, Sana, SDXL)
detection.py       the Mask Generator: GroundingDINO boxes, SAM masks, merged pseudo-labels
pipelines.py       GPU fast paths of the diffusion pipelines
"""
