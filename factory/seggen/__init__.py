"""Training the SegGen models (`factory train text2mask|mask2img`) on Ray Train.

spec.py         the training spec
train.py        the driver and the worker loop
data.py         (caption, colour map, image) pairs from a source, in a resumable order
models.py       the SDXL pieces a worker trains and the denoising loss
checkpoints.py  checkpoints and the final model folder
"""
