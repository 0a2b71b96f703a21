"""A PNG contact sheet of a job's output: one row per sample, image | mask | overlay."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from factory.output.layout import OutputStore
from factory.output.samples import decode_image, decode_mask, iter_samples
from factory.sources.classes import ade150_palette, colorize

CELL = 192


def display_palette(num_classes: int) -> np.ndarray:
    """ADE150 colours for the first 150 ids, then fixed pseudo-random colours."""
    rng = np.random.default_rng(0)
    extra = rng.integers(0, 256, size=(max(num_classes - 150, 0), 3), dtype=np.uint8)
    return np.concatenate([ade150_palette(), extra])[: max(num_classes, 1)]


def _cell(rgb: np.ndarray) -> Image.Image:
    img = Image.fromarray(rgb)
    # Scaled to fit the cell, up or down; NEAREST so mask edges stay sharp and colours exact.
    scale = CELL / max(img.width, img.height)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (CELL, CELL), (32, 32, 32))
    canvas.paste(img, ((CELL - img.width) // 2, (CELL - img.height) // 2))
    return canvas


def contact_sheet(store: OutputStore, out_path: str, count: int = 8) -> str:
    manifest = store.read_manifest()
    palette = display_palette(len(manifest["classes"]))
    rows = []
    for _, key, files in iter_samples(store):
        image, mask = decode_image(files), decode_mask(files)
        if mask is not None:
            colours = colorize(mask, palette)
            labelled = (mask != manifest["ignore_index"])[..., None]
            overlay = np.where(labelled, (image * 0.5 + colours * 0.5).astype(np.uint8), image)
        else:  # unlabeled samples (text-to-image recipes) show the image alone
            colours = overlay = np.zeros_like(image)
        rows.append((key, [image, colours, overlay]))
        if len(rows) == count:
            break
    if not rows:
        raise FileNotFoundError(f"{store.url}: no committed shard with samples to preview")
    label_h = 14
    sheet = Image.new("RGB", (3 * CELL, len(rows) * (CELL + label_h)), (16, 16, 16))
    draw = ImageDraw.Draw(sheet)
    for r, (key, cells) in enumerate(rows):
        y = r * (CELL + label_h)
        draw.text((4, y + 1), f"{key}   image | mask | overlay", fill=(230, 230, 230))
        for c, cell in enumerate(cells):
            sheet.paste(_cell(cell), (c * CELL, y + label_h))
    sheet.save(out_path)
    return out_path
