"""Sample grids: labelled rows, and labels whose words stay apart."""
import numpy as np

from jdit import grid


def word_gaps(label: str) -> int:
  """Blank column runs of 3+ pixels between the inked columns of a rendered one-row label."""
  panel = grid.make_grid(np.zeros((1, 8, 8, 1), np.uint8), 1, [label])[:, :-(64 + 2 * grid.GAP), 0]
  ink = (panel > grid.BACKGROUND + 40).any(axis=0)
  columns = np.flatnonzero(ink)
  blank = np.diff(columns) - 1  # blank columns between consecutive inked ones
  return int((blank >= 3).sum())


def test_label_words_are_separated():
  """The default font's 2-pixel space vanished between 'zero' and 'and' ('white zeroand magenta five')."""
  assert word_gaps("zero and") == 1
  assert word_gaps("white zero and magenta five") == 4
  assert word_gaps("zero") == 0


def test_grid_shape_and_labels():
  images = np.full((6, 8, 16, 3), 200, np.uint8)
  out = grid.make_grid(images, 2, ["a", "b"])
  cell_h, cell_w = 64, 128  # upscaled to at least 64 pixels high
  assert out.shape[0] == 2 * (cell_h + grid.GAP) + grid.GAP
  assert out.shape[1] > 3 * (cell_w + grid.GAP) + grid.GAP and out.dtype == np.uint8
