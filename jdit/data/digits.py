"""scikit-learn's bundled 8x8 digits (1,797 images, 10 classes): the embedded default, no download.

    data.source = "digits"    (data.image_size=8, data.channels=1)
"""
import numpy as np

from jdit.data import checks, transforms

PROVIDES = ("image", "label")


class DigitsSource:
  """The 8x8 grayscale digits scaled to uint8 0..255, shape (8, 8, 1)."""

  def __init__(self):
    from sklearn.datasets import load_digits
    digits = load_digits()
    self.images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    self.labels = digits.target.astype(np.int32)
    self.sizes = np.full((len(self.labels), 2), 8, np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict:
    return {"image": self.images[index], "label": int(self.labels[index])}


def open_source(data) -> DigitsSource:
  del data
  return DigitsSource()


transform = transforms.image_transform
check = checks.check_images
