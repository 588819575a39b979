"""Reading and writing ADM evaluator batches (.npz): `arr_0` (N, H, W, 3) uint8, and for reference batches the
precomputed statistics `mu`, `sigma` (pool_3) and `mu_s`, `sigma_s` (spatial).

An array is streamed from the archive in batches (memory bounded by one batch, not by the 10 GB of 50,000
256x256 images); other arrays are small and read whole.
"""
import os
import zipfile

import numpy as np

STATISTICS = ("mu", "sigma", "mu_s", "sigma_s")


def _read_header(f) -> tuple[tuple, np.dtype, bool]:
  """(shape, dtype, fortran_order) of an .npy stream, left at the first byte of data."""
  version = np.lib.format.read_magic(f)
  read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
  shape, fortran_order, dtype = read(f)
  return shape, dtype, fortran_order


class NpzArray:
  """One array of an .npz: `shape`, `dtype`, and `batches(size)` yielding consecutive (size, ...) slices."""

  def __init__(self, path: str, name: str):
    self.path, self.name = path, name
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: no such file")
    try:
      with zipfile.ZipFile(path) as archive, archive.open(f"{name}.npy") as f:
        self.shape, self.dtype, self.fortran_order = _read_header(f)
    except KeyError:
      with zipfile.ZipFile(path) as archive:
        names = sorted(n[:-4] for n in archive.namelist())
      raise ValueError(f"{path}: no {name!r} array (it holds {', '.join(names) or 'nothing'})") from None
    except zipfile.BadZipFile as e:
      raise ValueError(f"{path}: not an .npz archive ({e})") from None

  def __len__(self) -> int:
    return self.shape[0] if self.shape else 0

  def batches(self, size: int, begin: int = 0, end: int | None = None):
    """Consecutive slices of at most `size` rows of rows [begin, end) (default: all)."""
    end = len(self) if end is None else end
    row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
    with zipfile.ZipFile(self.path) as archive, archive.open(f"{self.name}.npy") as f:
      _read_header(f)
      f.seek(begin * row, os.SEEK_CUR)
      for start in range(begin, end, size):
        count = min(size, end - start)
        data = f.read(count * row)
        if len(data) < count * row:
          raise ValueError(f"{self.path}: {self.name} ends after {start} of {len(self)} rows (truncated file)")
        yield np.frombuffer(data, self.dtype).reshape(count, *self.shape[1:])


def open_images(path: str, field: str = "arr_0") -> NpzArray:
  """The `arr_0` images of an evaluator batch; a one-line ValueError unless they are uint8 (N, H, W, 3) (or
  grayscale (N, H, W, 1), as the digits default writes)."""
  images = NpzArray(path, field)
  if images.dtype != np.uint8 or len(images.shape) != 4 or images.shape[-1] not in (1, 3) or images.fortran_order:
    raise ValueError(f"{path}: {field} must be uint8 images (N, H, W, 3) in C order, got {images.dtype} "
                     f"{images.shape}")
  return images


def read_statistics(path: str) -> dict[str, np.ndarray] | None:
  """The reference statistics stored with a batch (all four of STATISTICS), or None."""
  with np.load(path) as contents:
    if all(name in contents.files for name in STATISTICS):
      return {name: np.asarray(contents[name], np.float64) for name in STATISTICS}
  return None


def write_reference(path: str, images: np.ndarray, statistics: dict[str, np.ndarray]) -> None:
  """An ADM reference batch: arr_0 and the four statistics, written to a temporary name and renamed."""
  temporary = path + ".tmp.npz"
  np.savez(temporary, arr_0=images, **{name: statistics[name] for name in STATISTICS})
  os.replace(temporary, path)
