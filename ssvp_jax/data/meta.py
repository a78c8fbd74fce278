"""meta.json: the dataset index that AnomalyCLIP, AdaCLIP and Bayes-PFL write and read.

    {"train": {cls: [row, ...]}, "test": {cls: [row, ...]}}
    row = {"img_path": str, "mask_path": str, "cls_name": str, "specie_name": str, "anomaly": 0 | 1}

Paths are relative to the dataset root; normal rows have mask_path "" and anomaly 0.
Reading accepts the variants those repositories write: "Train"/"Test" keys (AnomalyCLIP's
DAGM script), extra keys such as "dataset_name", paths that start with the root folder's
own name (Bayes-PFL: relative to the root's parent), the empty placeholder row Bayes-PFL
writes for an empty train split, and an empty specie_name (VisA, DAGM).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Mapping, Sequence

from ssvp_jax.data import common
from ssvp_jax.data.common import DatasetError
from ssvp_jax.data.records import Record

log = logging.getLogger(__name__)

META_FILE = "meta.json"


def _resolve(root: str, rel: str, meta_path: str, where: str) -> str:
  """An existing file for a row's path: under the root, else under the root's parent (Bayes-PFL)."""
  for base in (root, os.path.dirname(os.path.abspath(root))):
    path = os.path.join(base, rel)
    if os.path.isfile(path):
      return path
  raise DatasetError(f"{os.path.join(root, rel)}: listed in {meta_path} ({where}) but not found")


def read_meta(root: str, split: str = "test", categories: Sequence[str] | None = None, *,
              path: str | None = None) -> list[Record]:
  """Records of one split of `<root>/meta.json` (or `path`).

  An anomalous row with an empty mask_path gives mask_path None: the lineage writes such
  rows for datasets without masks, which allow image-level metrics only.
  """
  path = path or os.path.join(root, META_FILE)
  if not os.path.isfile(path):
    raise DatasetError(f"{path}: meta.json not found (write one with python -m ssvp_jax.data.make_meta)")
  try:
    with open(path) as f:
      info = json.load(f)
  except json.JSONDecodeError as e:
    raise DatasetError(f"{path}: not valid JSON ({e})") from e
  keys = {k.lower(): k for k in info} if isinstance(info, dict) else {}
  if split not in keys or not isinstance(info[keys[split]], dict):
    raise DatasetError(f"{path}: no '{split}' split mapping categories to rows (keys: {list(keys)})")
  by_cat = info[keys[split]]
  records = []
  for cat in common.select_categories(list(by_cat), categories, path, "meta.json"):
    cat_records, placeholders, maskless = [], 0, 0
    for i, row in enumerate(by_cat[cat]):
      where = f"{split}/{cat} row {i}"
      if not isinstance(row, dict) or "img_path" not in row or "anomaly" not in row:
        raise DatasetError(f"{path}: {where} lacks img_path or anomaly: {row!r}")
      if not row["img_path"]:
        placeholders += 1
        continue
      anomaly = int(row["anomaly"])
      if anomaly not in (0, 1):
        raise DatasetError(f"{path}: {where} has anomaly={row['anomaly']!r}, expected 0 or 1")
      image = _resolve(root, row["img_path"], path, where)
      mask = _resolve(root, row["mask_path"], path, where) if row.get("mask_path") else None
      maskless += anomaly and mask is None
      defect = "good" if anomaly == 0 else (row.get("specie_name") or "anomaly")
      cat_records.append(Record(image, mask, cat, defect, anomaly, split))
    if placeholders:
      log.info("%s: %s/%s holds %d placeholder row(s) with an empty img_path", path, split, cat, placeholders)
    if maskless:
      log.info("%s: %s/%s has %d anomalous row(s) without mask_path (image-level metrics only)",
               path, split, cat, maskless)
    records += common.check_nonempty(cat_records, cat, f"{path} ({split})")
  return records


def _relative(path: str, root: str) -> str:
  return os.path.relpath(os.path.abspath(path), os.path.abspath(root)).replace(os.sep, "/")


def meta_dict(records_by_split: Mapping[str, Sequence[Record]], root: str) -> dict:
  """The meta.json structure for {split: records}, paths relative to `root`."""
  info: dict[str, dict[str, list]] = {"train": {}, "test": {}}
  for split, records in records_by_split.items():
    for r in records:
      info.setdefault(split, {}).setdefault(r.category, []).append({
          "img_path": _relative(r.image_path, root),
          "mask_path": _relative(r.mask_path, root) if r.mask_path else "",
          "cls_name": r.category,
          "specie_name": r.defect,
          "anomaly": int(r.label),
      })
  return info


def write_meta(records_by_split: Mapping[str, Sequence[Record]], root: str, path: str | None = None) -> str:
  """Writes meta.json (default `<root>/meta.json`) formatted as the lineage does; returns its path."""
  path = path or os.path.join(root, META_FILE)
  with open(path, "w") as f:
    f.write(json.dumps(meta_dict(records_by_split, root), indent=4) + "\n")
  return path
