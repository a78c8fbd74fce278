"""RSDD (Rail Surface Defect Datasets, Gan et al. 2017), in either of the two forms in use.

The release (195 images, all with defects):

    <root>/Type-I RSDDs dataset/Rail surface images/<stem>.jpg     category "rail_type1"
    <root>/Type-I RSDDs dataset/GroundTruth/<stem>.jpg             (JPEG masks, > 127)
    <root>/Type-II RSDDs dataset/...                               category "rail_type2"

The cropped positive/negative split that Bayes-PFL's preparation script reads (the form
behind the zero-shot numbers, which need normal images):

    <root>/pos/<stem>.jpg with mask <root>/pos/<stem>.png            category "rail"
    <root>/neg/<stem>.jpg (its all-zero <stem>.png, if any, is ignored)

Masks are paired by stem. In the release an image whose mask is empty counts as normal.

Protocols (ssvp_jax/data/protocols.py): "full" keeps every image; "bayes_pfl" (the paper configs,
which read only the "rail" pos/neg form) keeps every defective crop and as many normal ones (the
first by file name), as Bayes-PFL's RSDD script does. Prompt words (D4): "metal15" for "rail",
Bayes-PFL's name for it; "rail" for the two release categories, which Bayes-PFL does not use.
"""

from __future__ import annotations

import os
from typing import Sequence

from ssvp_jax.data import common
from ssvp_jax.data.pipeline import load_mask
from ssvp_jax.data.records import Record

TYPE_DIRS = {"rail_type1": "Type-I RSDDs dataset", "rail_type2": "Type-II RSDDs dataset"}
RSDD_CATEGORIES = ("rail_type1", "rail_type2", "rail")


def _read_release(root: str, cat: str) -> list[Record]:
  base = os.path.join(root, TYPE_DIRS[cat])
  image_dir = common.require_dir(os.path.join(base, "Rail surface images"), "RSDD rail images")
  mask_dir = common.require_dir(os.path.join(base, "GroundTruth"), "RSDD ground truth")
  masks = common.index_by_stem(mask_dir)
  records = []
  for path in common.list_images(image_dir):
    mask = common.find_mask(masks, path, ("",), mask_dir)
    positive = bool(load_mask(mask).any())
    records.append(Record(path, mask if positive else None, cat, "anomaly" if positive else "good",
                          int(positive), "test"))
  common.warn_unused_masks(masks, [common.find_mask(masks, r.image_path, ("",), mask_dir) for r in records],
                           mask_dir)
  return common.check_nonempty(records, cat, image_dir)


def _split_pos_neg(folder: str) -> tuple[list[str], dict[str, str]]:
  """Images (non-PNG files) and {stem: mask} (PNG files) of one pos/ or neg/ folder."""
  images, masks = [], {}
  for path in common.list_images(folder):
    if path.lower().endswith(".png"):
      masks[common.stem(path)] = path
    else:
      images.append(path)
  return images, masks


def _read_pos_neg(root: str) -> list[Record]:
  records = []
  neg_dir = common.require_dir(os.path.join(root, "neg"), "RSDD normal crops (neg/)")
  pos_dir = common.require_dir(os.path.join(root, "pos"), "RSDD defect crops (pos/)")
  images, masks = _split_pos_neg(pos_dir)
  for path in images:
    records.append(Record(path, common.find_mask(masks, path, ("",), pos_dir), "rail", "anomaly", 1, "test"))
  records += [Record(p, None, "rail", "good", 0, "test") for p in _split_pos_neg(neg_dir)[0]]
  return common.check_nonempty(records, "rail", root)


def read_rsdd(root: str, split: str = "test", categories: Sequence[str] | None = None) -> list[Record]:
  """RSDD records: release categories and/or the pos/neg form (a test split only)."""
  del split  # datasets.read_dataset admits only "test" for RSDD
  common.require_dir(root, "an RSDD root")
  found = [c for c, d in TYPE_DIRS.items() if os.path.isdir(os.path.join(root, d))]
  if os.path.isdir(os.path.join(root, "pos")) or os.path.isdir(os.path.join(root, "neg")):
    found.append("rail")
  if not found and categories is None:
    raise common.DatasetError(f"{root}: not an RSDD root (expected '{TYPE_DIRS['rail_type1']}/', "
                              f"'{TYPE_DIRS['rail_type2']}/' or pos/ + neg/)")
  records = []
  for cat in common.select_categories(found, categories, root, "RSDD"):
    records += _read_pos_neg(root) if cat == "rail" else _read_release(root, cat)
  return records

