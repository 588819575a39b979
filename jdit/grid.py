"""Sample grids as images: cells separated by gaps, each row labelled (the class, or the prompt) on its left.

    grid = make_grid(images, rows=4, labels=["red three and blue seven", ...])   # (H', W', C) uint8
    save_png(grid, "samples.png")
"""
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GAP = 2  # pixels between cells, and around the grid
BACKGROUND = 48  # gray of gaps and the label panel
MAX_LABEL_CHARS = 48
WORD_GAP = 4  # pixels between the words of a label


def _words(text: str, font) -> list[tuple[str, int]]:
  """Each word of `text` and its x offset: words drawn apart by WORD_GAP pixels (the default font's 2-pixel space
  vanishes between some letters at this size: 'zero and' read 'zeroand')."""
  measure = ImageDraw.Draw(Image.new("L", (1, 1)))
  placed, x = [], 0
  for word in text.split():
    placed.append((word, x))
    x += int(measure.textlength(word, font=font)) + WORD_GAP
  return placed


def _label_panel(labels: list[str], cell: int, gap: int) -> np.ndarray:
  """(rows * (cell + gap) + gap, width) uint8 gray panel with each row's label centred vertically on its row."""
  font = ImageFont.load_default()
  texts = [t if len(t) <= MAX_LABEL_CHARS else t[:MAX_LABEL_CHARS - 3] + "..." for t in map(str, labels)]
  measure = ImageDraw.Draw(Image.new("L", (1, 1)))
  right = lambda text: max([x + measure.textbbox((0, 0), w, font=font)[2] for w, x in _words(text, font)] or [0])
  width = 2 * gap + max(map(right, texts)) + 4
  height = len(texts) * (cell + gap) + gap
  panel = Image.new("L", (width, height), BACKGROUND)
  draw = ImageDraw.Draw(panel)
  for row, text in enumerate(texts):
    top, bottom = measure.textbbox((0, 0), text or " ", font=font)[1::2]
    y = gap + row * (cell + gap) + (cell - (bottom - top)) // 2 - top
    for word, x in _words(text, font):
      draw.text((gap + 2 + x, y), word, fill=235, font=font)
  return np.asarray(panel)


def make_grid(images: np.ndarray, rows: int, labels: list[str] | None = None, min_size: int = 64) -> np.ndarray:
  """(N, H, W, C) uint8 -> one image: `rows` rows of cells upscaled (nearest) to at least min_size pixels,
  separated by gaps, with `labels` (one per row) in a panel on the left."""
  n, h, w, c = images.shape
  scale = max(1, math.ceil(min_size / h))
  images = images.repeat(scale, axis=1).repeat(scale, axis=2)
  ch, cw = h * scale, w * scale
  cols = math.ceil(n / rows)
  grid = np.full((rows * (ch + GAP) + GAP, cols * (cw + GAP) + GAP, c), BACKGROUND, np.uint8)
  for i in range(n):
    top, left = GAP + (i // cols) * (ch + GAP), GAP + (i % cols) * (cw + GAP)
    grid[top:top + ch, left:left + cw] = images[i]
  if labels is not None:
    if len(labels) != rows:
      raise ValueError(f"make_grid: {len(labels)} labels for {rows} rows")
    panel = _label_panel(labels, ch, GAP)
    grid = np.concatenate([np.repeat(panel[:, :, None], c, axis=2), grid], axis=1)
  return grid


def save_png(image: np.ndarray, path: str) -> None:
  """Writes atomically (temporary file, then rename)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(path + ".tmp.png")
  os.replace(path + ".tmp.png", path)
