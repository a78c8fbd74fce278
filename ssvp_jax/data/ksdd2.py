"""KolektorSDD2 (KSDD2), as released.

    <root>/train/NNNNN.png  <root>/train/NNNNN_GT.png
    <root>/test/NNNNN.png   <root>/test/NNNNN_GT.png

Every image has a `_GT` mask; negatives have an all-zero one. An image is positive when
its mask has any pixel > 0, so reading a split decodes every mask once (3,335 masks, a few
seconds: docs/data.md). Negatives get mask_path None, like normal images everywhere else.

Protocols (ssvp_jax/data/protocols.py): "full" keeps every image of the split; "bayes_pfl" (the
paper configs) keeps every positive and only as many negatives (the first by file name), as
Bayes-PFL's KSDD2 script does. Prompt word (D4): "metal", Bayes-PFL's name for the class.
"""

from __future__ import annotations

import os
from typing import Sequence

from ssvp_jax.data import common
from ssvp_jax.data.pipeline import load_mask
from ssvp_jax.data.records import Record

KSDD2_CATEGORIES = ("ksdd2",)
GT_SUFFIX = "_GT"


def read_ksdd2(root: str, split: str = "test", categories: Sequence[str] | None = None) -> list[Record]:
  """KSDD2 records of one split; one category, "ksdd2"."""
  common.select_categories(KSDD2_CATEGORIES, categories, root, "KSDD2")
  split_dir = common.require_dir(os.path.join(root, split),
                                 "a KSDD2 root with train/ and test/ holding NNNNN.png and NNNNN_GT.png")
  files = common.index_by_stem(split_dir)
  masks = {s: p for s, p in files.items() if s.endswith(GT_SUFFIX)}
  records = []
  for s, path in sorted(files.items()):
    if s.endswith(GT_SUFFIX):
      continue
    mask = common.find_mask(masks, path, (GT_SUFFIX,), split_dir)
    positive = bool(load_mask(mask).any())
    records.append(Record(path, mask if positive else None, "ksdd2",
                          "anomaly" if positive else "good", int(positive), split))
  common.warn_unused_masks(masks, [common.find_mask(masks, r.image_path, (GT_SUFFIX,), split_dir)
                                   for r in records], split_dir)
  return common.check_nonempty(records, "ksdd2", split_dir)
