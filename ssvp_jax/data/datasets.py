"""One entry point for every dataset layout: `read_dataset(name, root, split, categories)`.

    from ssvp_jax.data.datasets import read_dataset, DATASETS
    records = read_dataset("mvtec", "/data/mvtec_anomaly_detection", split="test")

Each reader returns `Record`s sorted by category, then by file name (VisA: CSV order),
and raises `DatasetError` naming the file or folder when the tree is not what the layout
promises. Readers that find categories by folder (MVTec-like, BTAD, DAGM, folder) read
whatever categories are present when `categories` is None; `DATASETS[name].categories`
lists the official ones.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from ssvp_jax.data import common, protocols
from ssvp_jax.data.btad import BTAD_CATEGORIES, read_btad
from ssvp_jax.data.common import DatasetError
from ssvp_jax.data.dagm import DAGM_CATEGORIES, read_dagm
from ssvp_jax.data.folder import read_folder
from ssvp_jax.data.ksdd2 import KSDD2_CATEGORIES, read_ksdd2
from ssvp_jax.data.meta import read_meta
from ssvp_jax.data.mvtec import DTD_CATEGORIES, MPDD_CATEGORIES, MVTEC_CATEGORIES, read_mvtec
from ssvp_jax.data.records import Record
from ssvp_jax.data.rsdd import RSDD_CATEGORIES, read_rsdd
from ssvp_jax.data.visa import VISA_CATEGORIES, read_visa

Reader = Callable[[str, str, Sequence[str] | None], list[Record]]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """A layout: its reader, official categories (empty: any), and the splits it has."""
  reader: Reader
  categories: tuple[str, ...]
  splits: tuple[str, ...]
  title: str


DATASETS: dict[str, DatasetInfo] = {
    "mvtec": DatasetInfo(read_mvtec, MVTEC_CATEGORIES, ("train", "test"), "MVTec-AD"),
    "visa": DatasetInfo(read_visa, VISA_CATEGORIES, ("train", "test"), "VisA (split_csv/1cls.csv)"),
    "mpdd": DatasetInfo(read_mvtec, MPDD_CATEGORIES, ("train", "test"), "MPDD (MVTec layout)"),
    "btad": DatasetInfo(read_btad, BTAD_CATEGORIES, ("train", "test"), "BTAD"),
    "ksdd2": DatasetInfo(read_ksdd2, KSDD2_CATEGORIES, ("train", "test"), "KolektorSDD2"),
    "rsdd": DatasetInfo(read_rsdd, RSDD_CATEGORIES, ("test",), "RSDD rails"),
    "dagm": DatasetInfo(read_dagm, DAGM_CATEGORIES, ("train", "test"), "DAGM 2007"),
    "dtd": DatasetInfo(read_mvtec, DTD_CATEGORIES, ("train", "test"), "DTD-Synthetic (MVTec layout)"),
    "folder": DatasetInfo(read_folder, (), ("test",), "your own folders: good/, <defect>/, masks/"),
    "meta": DatasetInfo(read_meta, (), ("train", "test"), "any root with a meta.json"),
}


def read_dataset(name: str, root: str, split: str = "test", categories: Sequence[str] | None = None, *,
                 verify: bool = False, protocol: str = "full") -> list[Record]:
  """Reads the records of one split of a dataset on disk.

  Args:
    name: a key of DATASETS ("mvtec", "visa", "mpdd", "btad", "ksdd2", "rsdd", "dagm", "dtd",
      "folder", "meta").
    root: the dataset's root folder, as its publisher ships it.
    split: "test" (what zero-shot training and evaluation use) or "train".
    categories: subset to read; None reads all present.
    verify: also open every image's and mask's header now: unreadable files and masks whose
      size differs from their image raise here instead of when the pipeline loads them.
    protocol: "full" (the publisher's split) or "bayes_pfl" (the classes and images Bayes-PFL
      evaluates, see `ssvp_jax.data.protocols`); explicit `categories` override its class list.
  """
  info = DATASETS.get(name.lower())
  if info is None:
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
  if split not in info.splits:
    raise DatasetError(f"{info.title} has no {split!r} split (it has: {', '.join(info.splits)})")
  if categories is None:
    categories = protocols.default_categories(name.lower(), protocol)
  records = protocols.apply(name.lower(), info.reader(root, split, categories), protocol)
  if verify:
    common.verify_records(records)
  return records
