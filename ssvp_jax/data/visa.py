"""VisA, read through its official split file `split_csv/1cls.csv`.

    <root>/split_csv/1cls.csv                   header: object,split,label,image,mask
    <root>/<category>/Data/Images/{Normal,Anomaly}/*.JPG
    <root>/<category>/Data/Masks/Anomaly/*.png  pixel values 1, 2, ... (not 255): anomaly is > 0

Paths in the CSV are relative to the root; the mask column is empty for normal rows.
The CSV pairs each image with its mask; the reader still checks that both files exist and
share a stem, so a shifted or edited CSV fails loudly instead of mis-pairing.
"""

from __future__ import annotations

import csv
import os
from typing import Sequence

from ssvp_jax.data import common
from ssvp_jax.data.common import DatasetError
from ssvp_jax.data.records import Record

VISA_CATEGORIES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1",
    "pcb2", "pcb3", "pcb4", "pipe_fryum")
SPLIT_CSV = os.path.join("split_csv", "1cls.csv")
_COLUMNS = ("object", "split", "label", "image", "mask")


def _existing(root: str, rel: str, csv_path: str, line: int, what: str) -> str:
  path = os.path.join(root, rel)
  if not os.path.isfile(path):
    raise DatasetError(f"{path}: {what} listed in {csv_path} line {line} not found")
  return path


def read_visa(root: str, split: str = "test", categories: Sequence[str] | None = None) -> list[Record]:
  """VisA records of one split, grouped by category (CSV order within a category)."""
  common.require_dir(root, "a VisA root")
  csv_path = os.path.join(root, SPLIT_CSV)
  if not os.path.isfile(csv_path):
    raise DatasetError(f"{root}: not a VisA root ({SPLIT_CSV} not found)")
  by_cat: dict[str, list[Record]] = {}
  with open(csv_path, newline="") as f:
    reader = csv.DictReader(f)
    if reader.fieldnames is None or any(c not in reader.fieldnames for c in _COLUMNS):
      raise DatasetError(f"{csv_path}: header must hold {','.join(_COLUMNS)}, got {reader.fieldnames}")
    for line, row in enumerate(reader, start=2):
      cat = row["object"]
      by_cat.setdefault(cat, [])
      if row["split"] != split:
        continue
      label = row["label"].strip().lower()
      if label not in ("normal", "anomaly"):
        raise DatasetError(f"{csv_path} line {line}: label must be 'normal' or 'anomaly', got {row['label']!r}")
      image = _existing(root, row["image"], csv_path, line, "image")
      if label == "normal":
        by_cat[cat].append(Record(image, None, cat, "good", 0, split))
        continue
      if not row["mask"]:
        raise DatasetError(f"{image}: anomalous image has no mask in {csv_path} line {line}")
      mask = _existing(root, row["mask"], csv_path, line, "mask")
      if common.stem(mask) != common.stem(image):
        raise DatasetError(f"{csv_path} line {line}: mask {mask} does not share the stem of image {image}")
      by_cat[cat].append(Record(image, mask, cat, "anomaly", 1, split))
  records = []
  for cat in common.select_categories(sorted(by_cat), categories, root, "VisA"):
    records += common.check_nonempty(by_cat[cat], cat, f"{csv_path} (split {split!r})")
  return records
