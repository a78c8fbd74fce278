"""The one record type every dataset reader yields."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Record:
  """One image of a dataset.

  image_path: absolute path of the image file.
  mask_path:  absolute path of its ground-truth mask, or None (normal images,
              and anomalous images of datasets without masks).
  category:   product / texture class, e.g. "bottle".
  defect:     defect type ("good" for normal images), e.g. "broken_large".
  label:      0 normal, 1 anomalous.
  split:      "train" or "test".
  """
  image_path: str
  mask_path: str | None
  category: str
  defect: str
  label: int
  split: str
