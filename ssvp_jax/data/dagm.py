"""DAGM 2007, in the layout of its Kaggle upload that AnomalyCLIP reads.

    <root>/Class<N>/{Train,Test}/NNNN.PNG
    <root>/Class<N>/{Train,Test}/Label/NNNN_label.PNG     coarse ellipses, 0/255

Grayscale, 512x512. An image is defective exactly when `Label/<stem>_label.PNG` exists
(the rule AnomalyCLIP's and AdaCLIP's scripts use); `Label/Labels.txt` is not needed.
Split "train" reads Train/, "test" reads Test/ (both hold defective images).

Protocols (ssvp_jax/data/protocols.py): "full" reads Class1-Class10 with every image; "bayes_pfl"
(the paper configs) reads Class1-5, 7 and 8 and keeps, per class, every defective image and as
many normal ones (the first by file name), as Bayes-PFL's DAGM script does. Prompt words (D4):
"fabric1" ... "fabric8", Bayes-PFL's names for the classes.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

from ssvp_jax.data import common
from ssvp_jax.data.records import Record

DAGM_CATEGORIES = tuple(f"Class{i}" for i in range(1, 11))
LABEL_SUFFIX = "_label"


def _split_dir(cat_dir: str, split: str) -> str | None:
  """Train/ or Test/ (case-insensitive: some copies use lower case)."""
  for name in common.list_subdirs(cat_dir):
    if name.lower() == split:
      return os.path.join(cat_dir, name)
  return None


def read_dagm(root: str, split: str = "test", categories: Sequence[str] | None = None) -> list[Record]:
  """DAGM records of one split; categories Class1..Class10 (those present)."""
  common.require_dir(root, "a DAGM 2007 root")
  found = sorted((c for c in common.list_subdirs(root)
                  if re.fullmatch(r"Class\d+", c) and _split_dir(os.path.join(root, c), split)),
                 key=lambda c: int(c[5:]))
  if not found and categories is None:
    raise common.DatasetError(f"{root}: not a DAGM 2007 root (no Class<N>/{split.capitalize()}/ folders)")
  records = []
  for cat in common.select_categories(found, categories, root, "DAGM 2007"):
    split_dir = _split_dir(os.path.join(root, cat), split)
    label_dir = os.path.join(split_dir, "Label")
    masks = common.index_by_stem(label_dir)
    cat_records = []
    for path in common.list_images(split_dir):
      mask = masks.get(common.stem(path) + LABEL_SUFFIX)
      cat_records.append(Record(path, mask, cat, "good" if mask is None else "anomaly",
                                int(mask is not None), split))
    common.warn_unused_masks(masks, [r.mask_path for r in cat_records if r.mask_path], label_dir)
    records += common.check_nonempty(cat_records, cat, split_dir)
  return records
