"""Writes `<root>/meta.json` for a dataset on disk, in the format of AnomalyCLIP / AdaCLIP / Bayes-PFL.

    python -m ssvp_jax.data.make_meta --dataset mvtec --root /data/mvtec_anomaly_detection
    python -m ssvp_jax.data.make_meta --dataset rsdd --root /data/RSDD --splits test
    python -m ssvp_jax.data.make_meta --dataset dagm --root /data/DAGM2007 --protocol bayes_pfl

Prints, per category, the number of train images and of normal / anomalous test images.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Mapping, Sequence

from ssvp_jax.data.common import DatasetError
from ssvp_jax.data.datasets import DATASETS, read_dataset
from ssvp_jax.data.meta import write_meta
from ssvp_jax.data.records import Record


def make_meta(dataset: str, root: str, *, splits: Sequence[str] | None = None,
              categories: Sequence[str] | None = None, out: str | None = None,
              protocol: str = "full") -> tuple[dict[str, list[Record]], str]:
  """Reads `splits` (default: all the dataset has) under `protocol` ("full" or "bayes_pfl", see
  ssvp_jax/data/protocols.py) and writes meta.json; returns (records by split, path)."""
  splits = splits or DATASETS[dataset].splits
  by_split = {s: read_dataset(dataset, root, s, categories, protocol=protocol) for s in splits}
  return by_split, write_meta(by_split, root, out)


def count_table(by_split: Mapping[str, Sequence[Record]]) -> str:
  """A text table: category | train | test normal | test anomalous, and a total row."""
  cats: dict[str, list[int]] = {}
  for split, records in by_split.items():
    for r in records:
      row = cats.setdefault(r.category, [0, 0, 0])
      row[0 if split == "train" else 1 + r.label] += 1
  width = max([len("category"), len("total")] + [len(c) for c in cats])
  lines = [f"{'category':<{width}}  {'train':>7}  {'test ok':>7}  {'test ng':>7}"]
  for c, (tr, ok, ng) in cats.items():
    lines.append(f"{c:<{width}}  {tr:>7}  {ok:>7}  {ng:>7}")
  total = [sum(v[i] for v in cats.values()) for i in range(3)]
  lines.append(f"{'total':<{width}}  {total[0]:>7}  {total[1]:>7}  {total[2]:>7}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", required=True, choices=[n for n in DATASETS if n != "meta"])
  p.add_argument("--root", required=True, help="dataset root, as its publisher ships it")
  p.add_argument("--splits", nargs="+", choices=["train", "test"],
                 help="splits to index (default: all the dataset has)")
  p.add_argument("--categories", nargs="+", help="subset of categories (default: all present)")
  p.add_argument("--out", help="output path (default: ROOT/meta.json)")
  p.add_argument("--protocol", choices=["full", "bayes_pfl"], default="full",
                 help="full: the publisher's split; bayes_pfl: the classes and images Bayes-PFL evaluates "
                      "(DAGM classes 1-5, 7, 8; normal test images of DAGM, KSDD2, RSDD capped at the defective count)")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  try:
    by_split, path = make_meta(args.dataset, args.root, splits=args.splits, categories=args.categories,
                               out=args.out, protocol=args.protocol)
  except DatasetError as e:
    hint = "" if args.splits else " (a copy without a train split: pass --splits test)"
    print(f"error: {e}{hint}", file=sys.stderr)
    return 1
  print(count_table(by_split))
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
