"""Pieces every dataset reader shares: the error type, listing images, pairing masks by stem.

Readers never pair an image with a mask by position in two sorted listings: each
mask folder is indexed by file stem, and each image looks its mask up by name.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable, Sequence

from PIL import Image

from ssvp_jax.data.records import Record

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Lossy formats cannot hold an exact 0/1 mask: `pipeline.load_mask` thresholds them at 127.
LOSSY_EXTS = (".jpg", ".jpeg", ".webp")


class DatasetError(ValueError):
  """A dataset on disk is not what its reader expects: names the file or folder and the problem."""


def is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTS) and not name.startswith(".")


def stem(path: str) -> str:
  """File name without folder and extension: '/a/b/000_mask.png' -> '000_mask'."""
  return os.path.splitext(os.path.basename(path))[0]


def require_dir(path: str, what: str) -> str:
  """Returns `path` if it is a folder, else raises DatasetError saying what was expected there."""
  if not os.path.isdir(path):
    raise DatasetError(f"{path}: folder not found (expected {what})")
  return path


def list_images(folder: str) -> list[str]:
  """Absolute paths of the image files directly inside `folder`, sorted by name."""
  return [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if is_image(n)
          and os.path.isfile(os.path.join(folder, n))]


def list_subdirs(folder: str) -> list[str]:
  """Names of the sub-folders of `folder`, sorted (hidden ones skipped)."""
  return [n for n in sorted(os.listdir(folder))
          if not n.startswith(".") and os.path.isdir(os.path.join(folder, n))]


def index_by_stem(folder: str) -> dict[str, str]:
  """{stem: path} of the images in `folder` ({} when it does not exist).

  Two files with one stem (e.g. `000.png` and `000.bmp`) make the pairing ambiguous: that raises.
  """
  if not os.path.isdir(folder):
    return {}
  out: dict[str, str] = {}
  for path in list_images(folder):
    s = stem(path)
    if s in out:
      raise DatasetError(f"{folder}: two files with stem '{s}' ({os.path.basename(out[s])}, "
                         f"{os.path.basename(path)}); cannot tell which one is meant")
    out[s] = path
  return out


def find_mask(masks: dict[str, str], image_path: str, suffixes: Sequence[str], mask_dir: str) -> str:
  """The mask of `image_path` from a stem index, trying `<stem><suffix>` for each suffix in order.

  Raises DatasetError naming the image and the names that were tried.
  """
  s = stem(image_path)
  for suffix in suffixes:
    if s + suffix in masks:
      return masks[s + suffix]
  tried = ", ".join(f"{s}{x}.*" for x in suffixes)
  raise DatasetError(f"{image_path}: anomalous image has no mask (looked for {tried} in {mask_dir})")


def warn_unused_masks(masks: dict[str, str], used: Iterable[str], mask_dir: str) -> None:
  """Logs masks that no image claimed: usually a renamed or deleted image."""
  unused = sorted(set(masks.values()) - set(used))
  if unused:
    log.warning("%s: %d mask(s) belong to no image, e.g. %s", mask_dir, len(unused),
                os.path.basename(unused[0]))


def check_nonempty(records: list[Record], category: str, where: str) -> list[Record]:
  """An empty category is an error, never a silently empty evaluation."""
  if not records:
    raise DatasetError(f"{where}: category '{category}' has no images")
  return records


def select_categories(found: Sequence[str], wanted: Sequence[str] | None, root: str,
                      layout: str) -> list[str]:
  """The categories to read: all `found` ones, or `wanted` (each must exist)."""
  if wanted is None:
    if not found:
      raise DatasetError(f"{root}: not a {layout} layout (no category folders found)")
    return list(found)
  missing = [c for c in wanted if c not in found]
  if missing:
    raise DatasetError(f"{root}: categories {missing} not found in this {layout} root "
                       f"(found: {list(found)})")
  return list(wanted)


def image_size(path: str) -> tuple[int, int]:
  """(height, width) of an image as the pipeline decodes it (as stored, D22); reads the header only.

  Raises DatasetError naming the file when it cannot be read.
  """
  try:
    with Image.open(path) as im:
      w, h = im.size
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise DatasetError(f"{path}: cannot read image ({e})") from e
  return h, w


def verify_records(records: Sequence[Record]) -> None:
  """Opens the header of every image and mask: readable, and mask size == image size.

  Costs about a millisecond per file (no pixel decoding). The pipeline does the same
  checks when it loads each example, so this is only for failing before a long run.
  """
  for r in records:
    hw = image_size(r.image_path)
    if r.mask_path is not None:
      mhw = image_size(r.mask_path)
      if mhw != hw:
        raise DatasetError(f"{r.mask_path}: mask is {mhw[1]}x{mhw[0]} but its image "
                           f"{r.image_path} is {hw[1]}x{hw[0]} (width x height)")

