"""BTAD (BeanTech Anomaly Detection), as released (`BTech_Dataset_transformed`).

    <root>/<01|02|03>/train/ok/*
    <root>/<01|02|03>/test/{ok,ko}/*
    <root>/<01|02|03>/ground_truth/ko/*

Quirks: images of 01 and 03 are .bmp, of 02 .png; masks of 01 and 02 are `<stem>.png`,
masks of 03 keep the image's own name (`<stem>.bmp`). Pairing by stem covers all three.
Normal images get defect "good" (the folder says "ok"), anomalous ones "ko".

Both protocols (ssvp_jax/data/protocols.py) read the whole test split, as Bayes-PFL's BTAD script
does. Prompt words (D4): Bayes-PFL's names, "metal1" (01), "wood" (02), "metal2" (03).
"""

from __future__ import annotations

from typing import Sequence

from ssvp_jax.data.mvtec import read_mvtec_like
from ssvp_jax.data.records import Record

BTAD_CATEGORIES = ("01", "02", "03")


def read_btad(root: str, split: str = "test", categories: Sequence[str] | None = None) -> list[Record]:
  """BTAD records; masks found as `ground_truth/ko/<stem>.*`."""
  return read_mvtec_like(root, split, categories, layout="BTAD", normal_dir="ok",
                         mask_suffixes=("", "_mask"))
