"""Input pipeline: decode, resize, normalise and batch images for both backbones.

One decoded image feeds every "view" (`views(config)`: one per backbone role, at the configured
size with the backbone's mean/std; e.g. CLIP at 518 px with OpenAI's, DINOv3 at 592 px with
ImageNet's), so a batch looks like

    {"semantic": [B, 518, 518, 3] float32, "structural": [B, 592, 592, 3] float32,
     "mask": [B, S, S] float32 0/1, "label": [B] int32, "index": [B] int32,
     "valid": [B] bool, "has_mask": [B] bool}

as NumPy arrays. `index` is the example's position in the record list (-1 for padding);
`valid` is False only for padding; `has_mask` is False only for anomalous images whose
dataset has no masks (pixel metrics must skip those).

Batching runs on grain (`MapDataset` -> `IterDataset`): worker threads by default (PIL
decodes and resizes with the GIL released), worker processes on request. The element
order depends only on (seed, epoch), never on the number of threads or processes,
because batches are formed after the workers.

This module does not import JAX: grain's worker processes import it.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import grain
import numpy as np
from PIL import Image, ImageOps

from ssvp_jax.data.common import LOSSY_EXTS, DatasetError
from ssvp_jax.data.records import Record
from ssvp_jax.models.backbone import ROLES

_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

# PIL refuses images over 2 x 89.5 megapixels as "decompression bombs" (and warns above 89.5): our own,
# documented limit replaces its check. Decoding takes about 16 bytes per pixel (float32 RGB + the file's
# own pixels): 300 megapixels are ~5 GB. Predict and calibrate set it with --max_pixels.
Image.MAX_IMAGE_PIXELS = None
DEFAULT_MAX_PIXELS = 300_000_000
_limits = {"max_pixels": DEFAULT_MAX_PIXELS}


def set_max_pixels(n: int) -> None:
  """The largest image (width x height) that `load_image` and `load_mask` decode; larger ones raise."""
  if n < 1:
    raise ValueError(f"--max_pixels={n}: must be >= 1")
  _limits["max_pixels"] = int(n)
_RESERVED = ("mask", "label", "index", "valid", "has_mask")


@dataclasses.dataclass(frozen=True)
class View:
  """One backbone's input: batch key, square side in pixels, per-channel mean and std."""
  name: str
  size: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]


def views(config) -> tuple[View, ...]:
  """The inputs one image becomes, in ROLES order (semantic, structural): each backbone role's
  `config.backbones.<role>.image_size` with that backbone's MEAN/STD; view names are the roles."""
  from ssvp_jax.models import registry  # imports JAX, which grain's workers (importing this module) skip
  out = []
  for role in ROLES:
    section = config.backbones[role]
    cls = registry.lookup(role, section.name).cls
    out.append(View(role, int(section.image_size), tuple(cls.MEAN), tuple(cls.STD)))
  return tuple(out)


def _open(path: str, upright: bool = False) -> Image.Image:
  """Decodes a file fully (EXIF orientation applied when `upright`); DatasetError naming the file on failure."""
  try:
    with Image.open(path) as im:
      _check_size(path, im.width, im.height)
      im.load()
      return ImageOps.exif_transpose(im) if upright else im.copy()
  except DatasetError:
    raise
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise DatasetError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e


def _check_size(path: str, width: int, height: int) -> None:
  limit = _limits["max_pixels"]
  if width * height > limit:
    raise DatasetError(f"{path}: {width} x {height} = {width * height / 1e6:.0f} megapixels is over the limit of "
                       f"{limit / 1e6:g} megapixels (--max_pixels={limit}); raise --max_pixels if the machine has "
                       f"about 16 bytes of memory per pixel, or downscale the image")


def load_image(path: str, upright: bool = False) -> np.ndarray:
  """Reads any image as float32 [H, W, 3] in [0, 1].

  D22: pixels as stored by default (benchmark and training images: their masks carry no EXIF
  tag, and the reference code reads raw pixels); `upright=True` applies the EXIF orientation
  (a user's phone photos in predict/calibrate).

  Grayscale is repeated to three channels; 16-bit grayscale (PNG, TIFF) keeps its
  precision (/65535); 32-bit integer images are read as 16-bit data; float images are
  clipped to [0, 1]. Alpha is dropped, not composited (RGBA, LA, palette transparency),
  as PIL's `convert("RGB")` in the reference code does. Pillow reads 16-bit-per-channel
  colour PNGs as 8-bit RGB.
  """
  im = _open(path, upright)
  if im.mode in _16BIT_MODES or im.mode == "I":
    a = np.asarray(im).astype(np.float32) / 65535.0
  elif im.mode == "F":
    a = np.asarray(im, dtype=np.float32)
  else:
    if im.mode in ("P", "PA"):
      im = im.convert("RGBA")  # palette transparency becomes alpha, then dropped below
    elif im.mode in ("1", "LA", "La"):
      im = im.convert("L")
    elif im.mode not in ("L", "RGB", "RGBA"):
      im = im.convert("RGB")  # CMYK, YCbCr, RGBX, ...
    a = np.asarray(im).astype(np.float32) / 255.0
  if a.ndim == 2:
    a = np.repeat(a[:, :, None], 3, axis=2)
  return np.clip(a[:, :, :3], 0.0, 1.0)  # [H, W, 3]


def load_mask(path: str) -> np.ndarray:
  """Reads a ground-truth mask as bool [H, W]: a pixel is anomalous when any value > 0.

  Colour and palette masks count a pixel when any colour channel is > 0. Lossy files
  (JPEG, as in RSDD's release) are thresholded at > 127 instead, because their
  compression noise puts small non-zero values around every edge.
  """
  im = _open(path)
  if im.mode in ("P", "PA"):
    im = im.convert("RGBA")  # via RGBA: palette transparency must not trigger PIL's warning
  if im.mode in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr"):
    a = np.asarray(im if im.mode in ("RGB", "RGBA") else im.convert("RGB"))[:, :, :3].max(axis=2)
  elif im.mode in ("LA", "La"):
    a = np.asarray(im.convert("L"))
  else:
    a = np.asarray(im)  # 1, L, I;16, I, F
  threshold = 127 if path.lower().endswith(LOSSY_EXTS) else 0
  return a > threshold  # [H, W]


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
  """Bicubic resize of float [H, W, 3] to [size, size, 3], clipped to [0, 1].

  PIL's float ("F") resampling, channel by channel: the same antialiased bicubic filter
  that torchvision's `Resize(BICUBIC)` applies to PIL images in the reference code, without
  rounding to 8 bits.
  """
  if image.shape[:2] == (size, size):
    return image.astype(np.float32, copy=True)
  chans = [np.asarray(Image.fromarray(np.ascontiguousarray(image[:, :, c], dtype=np.float32))
                      .resize((size, size), Image.Resampling.BICUBIC)) for c in range(image.shape[2])]
  return np.clip(np.stack(chans, axis=2), 0.0, 1.0)  # [size, size, 3]


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of a 0/1 mask [H, W] to [size, size], then > 0.5: bool [size, size]."""
  m = Image.fromarray(mask.astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR)
  return np.asarray(m) > 0.5


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """(image - mean) / std per channel, float32 [..., 3]."""
  return ((image - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)


def load_example(record: Record, views: Sequence[View], mask_size: int, index: int = 0) -> dict:
  """Decodes one record into {view.name: [S_v, S_v, 3], "mask": [S, S], "label", ...}.

  Raises DatasetError naming the files when the mask's size differs from the image's.
  """
  image = load_image(record.image_path)  # [H, W, 3]
  ex = {v.name: normalize(resize_image(image, v.size), v.mean, v.std) for v in views}
  mask = np.zeros((mask_size, mask_size), np.float32)
  if record.mask_path is not None:
    full = load_mask(record.mask_path)  # [H, W]
    if full.shape != image.shape[:2]:
      hint = " (transposed?)" if full.shape == image.shape[1::-1] else ""
      raise DatasetError(f"{record.mask_path}: mask is {full.shape[1]}x{full.shape[0]} but its image "
                         f"{record.image_path} is {image.shape[1]}x{image.shape[0]} (width x height){hint}")
    mask = resize_mask(full, mask_size).astype(np.float32)
  ex.update(mask=mask, label=np.int32(record.label), index=np.int32(index), valid=np.bool_(True),
            has_mask=np.bool_(record.mask_path is not None or record.label == 0))
  return ex


class ExampleLoader:
  """grain map function: position -> example; positions past the records give padding.

  A plain picklable class (not a closure) so that grain's worker processes can use it.
  """

  def __init__(self, records: Sequence[Record], views: Sequence[View], mask_size: int):
    self.records = list(records)
    self.views = tuple(views)
    self.mask_size = mask_size

  def __call__(self, i: int) -> dict:
    i = int(i)
    if i < len(self.records):
      return load_example(self.records[i], self.views, self.mask_size, index=i)
    ex = {v.name: np.zeros((v.size, v.size, 3), np.float32) for v in self.views}
    ex.update(mask=np.zeros((self.mask_size, self.mask_size), np.float32), label=np.int32(0),
              index=np.int32(-1), valid=np.bool_(False), has_mask=np.bool_(False))
    return ex


def epoch_seed(seed: int, epoch: int) -> int:
  """The shuffle seed of one epoch: a hash of (seed, epoch) in [0, 2**32)."""
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def num_batches(num_records: int, batch_size: int, drop_remainder: bool = False) -> int:
  """How many batches one epoch yields (a padded or smaller last batch counts)."""
  return num_records // batch_size if drop_remainder else -(-num_records // batch_size)


def _mark_absl_flags_parsed() -> None:
  # grain reads absl flags in its workers; outside `absl.app.run` they are unparsed and
  # reading them raises (TRAPS.md).
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_dataset(records: Sequence[Record], views: Sequence[View], *, batch_size: int,
                 mask_size: int | None = None, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                 drop_remainder: bool = False, pad_remainder: bool = False, num_threads: int = 4,
                 num_processes: int = 0, prefetch: int = 16) -> grain.IterDataset:
  """A grain IterDataset of batches (dicts of NumPy arrays, see the module docstring) for one epoch.

  Args:
    records: the examples, e.g. from `datasets.read_dataset`.
    views: one entry per backbone input; names become batch keys.
    batch_size: examples per batch.
    mask_size: side of the "mask" array; defaults to the first view's size.
    shuffle: shuffle the order with a seed derived from (seed, epoch).
    seed, epoch: a new epoch gives a new order, the same pair the same order.
    drop_remainder: drop the last batch when it is smaller than batch_size (training).
    pad_remainder: fill the last batch to batch_size with padding (valid=False, index=-1),
      so that every batch has one shape (evaluation under jit). With neither option the
      last batch is simply smaller.
    num_threads: decoding threads per process (0: decode in the consuming thread).
    num_processes: grain worker processes (0: none). Entry points must sit under
      `if __name__ == "__main__":` (workers are spawned).
    prefetch: decoded examples buffered per process.
  """
  if drop_remainder and pad_remainder:
    raise ValueError("drop_remainder and pad_remainder exclude each other")
  if not records:
    raise ValueError("make_dataset: no records")
  names = [v.name for v in views]
  if len(set(names)) != len(names) or set(names) & set(_RESERVED):
    raise ValueError(f"view names must be unique and not in {_RESERVED}: {names}")
  mask_size = mask_size or views[0].size
  n = len(records)
  ds = grain.MapDataset.range(n)
  if shuffle:
    ds = ds.shuffle(seed=epoch_seed(seed, epoch))
  if pad_remainder and n % batch_size:
    ds = grain.MapDataset.concatenate([ds, grain.MapDataset.range(n, n + batch_size - n % batch_size)])
  it = ds.map(ExampleLoader(records, views, mask_size)).to_iter_dataset(
      grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
  if num_processes > 0:
    _mark_absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_processes, per_worker_buffer_size=2))
  return it.batch(batch_size, drop_remainder=drop_remainder)


def iterate_batches(records: Sequence[Record], views: Sequence[View], **kwargs) -> Iterator[dict]:
  """Yields the batches of `make_dataset(records, views, **kwargs)` and frees its workers at the end."""
  it = iter(make_dataset(records, views, **kwargs))
  try:
    yield from it
  finally:
    close = getattr(it, "close", None)
    if close is not None:
      close()
