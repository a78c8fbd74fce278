"""Benchmark protocols: which classes and which test images a zero-shot number is computed on.

Two protocols (SPEC section 6, "Benchmark protocol"):

  "bayes_pfl"  what Bayes-PFL's conversion scripts (`dataset/datasets/*.py`) keep, so that the
               paper's Table 1 is comparable: DAGM only classes 1, 2, 3, 4, 5, 7 and 8; DAGM,
               KSDD2 and RSDD's positive/negative form keep every defective image and only the
               first N normal ones in file-name order, N = the number of defective ones. BTAD,
               DTD-Synthetic, MVTec-AD and VisA keep their whole test split. The default of the
               paper configs (configs/mvtec.py, configs/visa.py).
  "full"       the publisher's split as it is (every class, every image). The default elsewhere.

Bayes-PFL's scripts read re-packaged copies (`pos/` and `neg/` folders) of DAGM and KSDD2; we
apply their rules to the publisher's test split, which is what those copies hold as far as the
scripts show. The class names Bayes-PFL gives these categories (e.g. "fabric1", "metal") are the
prompt words of D4 (`ssvp_jax.models.prompts.class_words`).
"""

from __future__ import annotations

from typing import Sequence

from ssvp_jax.data.records import Record

PROTOCOLS = ("bayes_pfl", "full")

# Classes Bayes-PFL evaluates, where it drops some (DAGM: 6, 9 and 10 are left out).
BAYES_PFL_CLASSES = {"dagm": tuple(f"Class{i}" for i in (1, 2, 3, 4, 5, 7, 8))}
# Datasets whose normal test images Bayes-PFL caps at the number of defective ones, per class.
BAYES_PFL_CAPPED = ("dagm", "ksdd2", "rsdd")


def _cap_normals(records: Sequence[Record]) -> list[Record]:
  """Per category: every anomalous record, and the first N normal ones by file name (N = anomalous count).

  A category without anomalous images (RSDD's release holds only defective ones) is kept whole.
  """
  out = []
  for cat in dict.fromkeys(r.category for r in records):
    rows = [r for r in records if r.category == cat]
    n_bad = sum(r.label for r in rows)
    if n_bad == 0:
      out += rows
      continue
    normals = sorted((r for r in rows if r.label == 0), key=lambda r: r.image_path)[:n_bad]
    keep = {id(r) for r in normals}
    out += [r for r in rows if r.label == 1 or id(r) in keep]
  return out


def default_categories(dataset: str, protocol: str) -> tuple[str, ...] | None:
  """The categories a protocol reads when the user names none (None: every one present)."""
  check(protocol)
  return BAYES_PFL_CLASSES.get(dataset) if protocol == "bayes_pfl" else None


def apply(dataset: str, records: Sequence[Record], protocol: str) -> list[Record]:
  """The records of `dataset` (a `datasets.DATASETS` key) that `protocol` keeps, order preserved."""
  check(protocol)
  if protocol == "full" or dataset not in BAYES_PFL_CAPPED:
    return list(records)
  return _cap_normals(records)


def check(protocol: str) -> None:
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r} (set the dataset's "
                     "`protocol` field, e.g. --config.eval_data.dagm.protocol=full)")
