"""MVTec-AD and the datasets that copy its layout (MPDD, DTD-Synthetic, BTAD with its own names).

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect>/*.png
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png     (0/255, one channel)

Grayscale categories (grid, screw, zipper) are converted to RGB by the pipeline.
Masks are found by stem: `<stem>_mask` first, then `<stem>` (BTAD, and the MVTec-style
trees that Bayes-PFL's preparation scripts write).
"""

from __future__ import annotations

import os
from typing import Sequence

from ssvp_jax.data import common
from ssvp_jax.data.records import Record

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
MPDD_CATEGORIES = (
    "bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes")
# The folder names of the DTD-Synthetic release (Aota et al., WACV 2023), as AnomalyCLIP and
# AdaCLIP list them; anomalies sit under test/bad and ground_truth/bad. Both protocols
# (ssvp_jax/data/protocols.py) read all 12 with the whole test split, as Bayes-PFL's DTD script
# does; the prompt words (D4) are Bayes-PFL's names ("woven1", "blotchy", ...).
DTD_CATEGORIES = (
    "Blotchy_099", "Fibrous_183", "Marbled_078", "Matted_069", "Mesh_114", "Perforated_037",
    "Stratified_154", "Woven_001", "Woven_068", "Woven_104", "Woven_125", "Woven_127")

MASK_SUFFIXES = ("_mask", "")


def read_mvtec_like(root: str, split: str, categories: Sequence[str] | None, *, layout: str,
                    normal_dir: str = "good", mask_suffixes: Sequence[str] = MASK_SUFFIXES) -> list[Record]:
  """Reads `<root>/<category>/<split>/<defect>/` with masks in `<category>/ground_truth/<defect>/`.

  Args:
    root: dataset root holding one folder per category.
    split: "train" or "test".
    categories: categories to read; None reads every folder that has a `<split>/` sub-folder.
    layout: name used in error messages ("MVTec-AD", "BTAD", ...).
    normal_dir: the folder of normal images ("good"; BTAD: "ok").
    mask_suffixes: mask stems tried in order, as `<image stem><suffix>`.
  """
  common.require_dir(root, f"a {layout} root")
  found = [c for c in common.list_subdirs(root) if os.path.isdir(os.path.join(root, c, split))]
  records = []
  for cat in common.select_categories(found, categories, root, layout):
    split_dir = os.path.join(root, cat, split)
    cat_records = []
    for defect in common.list_subdirs(split_dir):
      images = common.list_images(os.path.join(split_dir, defect))
      if defect == normal_dir:
        cat_records += [Record(p, None, cat, "good", 0, split) for p in images]
        continue
      mask_dir = os.path.join(root, cat, "ground_truth", defect)
      masks = common.index_by_stem(mask_dir)
      used = []
      for p in images:
        used.append(common.find_mask(masks, p, mask_suffixes, mask_dir))
        cat_records.append(Record(p, used[-1], cat, defect, 1, split))
      common.warn_unused_masks(masks, used, mask_dir)
    records += common.check_nonempty(cat_records, cat, split_dir)
  return records


def read_mvtec(root: str, split: str = "test", categories: Sequence[str] | None = None) -> list[Record]:
  """MVTec-AD (and MPDD, DTD-Synthetic, or any tree in the MVTec layout)."""
  return read_mvtec_like(root, split, categories, layout="MVTec-AD")
