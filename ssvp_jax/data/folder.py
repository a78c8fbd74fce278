"""A user's own data in plain folders.

One category (the category is the root folder's name):

    <root>/good/*.png            normal images
    <root>/<defect>/*.png        anomalous images, one folder per defect type
    <root>/masks/<defect>/<stem>.png or <root>/masks/<stem>.png   optional; `<stem>_mask.png` works too

or several: `<root>/<category>/{good,<defect>,masks}/` for each category (a category is a
sub-folder that has a `good/` folder).

Unlike the published datasets, which raise on the first problem, this reader is lenient
and says so: each of these is logged as a warning naming the file, then skipped --
an anomalous image without a mask while `masks/` exists, an image or mask that cannot be
opened, a mask whose size differs from its image, a category without images. Without any
`masks/` folder, anomalous images are kept with mask_path None (image-level metrics only).
Files are checked by reading their headers; a file that is cut short past its header
still fails later, in the pipeline, with a DatasetError naming it.
The folders have no train/test split: records carry the split that was asked for.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

from ssvp_jax.data import common
from ssvp_jax.data.records import Record

log = logging.getLogger(__name__)

NORMAL_DIR = "good"
MASKS_DIR = "masks"
MASK_SUFFIXES = ("", "_mask")


def _find_mask(indices: dict[str, dict[str, str]], masks_root: str, defect: str, image: str) -> str | None:
  """`masks/<defect>/` first, then `masks/`; stems `<stem>` then `<stem>_mask`. Indices are cached."""
  for folder in (os.path.join(masks_root, defect), masks_root):
    if folder not in indices:
      indices[folder] = common.index_by_stem(folder)
    for suffix in MASK_SUFFIXES:
      if common.stem(image) + suffix in indices[folder]:
        return indices[folder][common.stem(image) + suffix]
  return None


def _checked(record: Record) -> Record | None:
  """The record if its files open and agree in size, else None after a warning naming the file."""
  try:
    common.verify_records([record])
  except common.DatasetError as e:
    log.warning("skipping %s: %s", record.image_path, e)
    return None
  return record


def _read_category(cat_dir: str, cat: str, split: str) -> list[Record]:
  masks_root = os.path.join(cat_dir, MASKS_DIR)
  has_masks = os.path.isdir(masks_root)
  indices: dict[str, dict[str, str]] = {}
  records = []
  for defect in common.list_subdirs(cat_dir):
    if defect == MASKS_DIR:
      continue
    for path in common.list_images(os.path.join(cat_dir, defect)):
      if defect == NORMAL_DIR:
        r = Record(path, None, cat, "good", 0, split)
      else:
        mask = _find_mask(indices, masks_root, defect, path) if has_masks else None
        if has_masks and mask is None:
          log.warning("skipping %s: anomalous image has no mask in %s", path, masks_root)
          continue
        r = Record(path, mask, cat, defect, 1, split)
      if (r := _checked(r)) is not None:
        records.append(r)
  if not has_masks and any(r.label for r in records):
    log.info("%s: no %s/ folder, anomalous images have no masks (image-level metrics only)", cat_dir, MASKS_DIR)
  return records


def read_folder(root: str, split: str = "test", categories: Sequence[str] | None = None) -> list[Record]:
  """Records of a user folder (see the module docstring); skips bad files with a logged warning."""
  common.require_dir(root, "a folder with good/ and one folder per defect type")
  root = os.path.abspath(root)
  if os.path.isdir(os.path.join(root, NORMAL_DIR)):
    cat_dirs = {os.path.basename(root): root}
  else:
    cat_dirs = {c: os.path.join(root, c) for c in common.list_subdirs(root)
                if os.path.isdir(os.path.join(root, c, NORMAL_DIR))}
  if not cat_dirs:
    raise common.DatasetError(f"{root}: not a folder dataset (no {NORMAL_DIR}/ in it or in any sub-folder)")
  records = []
  for cat in common.select_categories(list(cat_dirs), categories, root, "folder"):
    cat_records = _read_category(cat_dirs[cat], cat, split)
    if not cat_records:
      log.warning("skipping category %s: %s holds no readable images", cat, cat_dirs[cat])
    records += cat_records
  if not records:
    raise common.DatasetError(f"{root}: no readable images in any category")
  return records
