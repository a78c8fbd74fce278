"""Demo data: small anomaly-detection datasets written in the real MVTec, VisA and BTAD layouts.

    python -m ssvp_jax.data.synth --layout mvtec --out /tmp/demo_src --categories source
    python -m ssvp_jax.data.synth --layout visa --out /tmp/demo_tgt --categories target --size 192

Normal images come from photographs inside scikit-image (brick, grass, coffee, ...) and
from procedural textures (gratings, Perlin stone, grids, dots, checkers, wavy bands, a
centred disc); defects are foreign-texture blends, scratches, colour spots and CutPaste
scars with exact masks (`synth_defects`). SOURCE_CATEGORIES and TARGET_CATEGORIES use
disjoint families, so "train on one, evaluate zero-shot on the other" mirrors the paper's
cross-dataset protocol. Output depends only on the arguments: the same seed writes the
same bytes, and each category's images depend on (seed, category) alone.

Layouts (per category):
  mvtec  train/good, test/good, test/<defect>/NNN.png, ground_truth/<defect>/NNN_mask.png (0/255)
  visa   Data/Images/{Normal,Anomaly}/*.JPG, Data/Masks/Anomaly/*.png (value 1), split_csv/1cls.csv
  btad   train/ok, test/{ok,ko}, ground_truth/ko; the i-th category copies the file
         quirks of BTAD class 0(i%3)+1: 01 .bmp images + .png masks, 02 .png + .png,
         03 .bmp images with .bmp masks of the same name
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import sys
import time
import zlib
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from ssvp_jax import faults, fileio
from ssvp_jax.data import synth_defects
from ssvp_jax.data import synth_textures as tex

log = logging.getLogger("ssvp_jax")

SOURCE_CATEGORIES = ("brick", "grass", "coffee", "grating", "checkers", "waves", "disc")
TARGET_CATEGORIES = ("gravel", "coins", "camera", "stone", "grid", "dots")
LAYOUTS = ("mvtec", "visa", "btad")
MARKER = ".complete.json"  # written last, holding the generator's parameters (see `ensure`)
_BTAD_EXTS = ((".bmp", ".png"), (".png", ".png"), (".bmp", ".bmp"))  # (image, mask) of BTAD 01, 02, 03


def _rng(seed: int, category: str, stream: int, index: int = 0) -> np.random.Generator:
  """Independent streams per (seed, category, purpose, image) so categories never disturb each other."""
  return np.random.default_rng([seed, zlib.crc32(category.encode()), stream, index])


def _save(img: np.ndarray, path: str, gray: bool) -> None:
  """float [S, S, 3] in [0, 1] -> 8-bit file (one channel when gray; JPEG quality 95)."""
  a = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
  im = Image.fromarray(a[:, :, 0] if gray else a)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if path.lower().endswith((".jpg", ".jpeg")):
    im.save(path, quality=95)
  elif path.lower().endswith(".png"):
    im.save(path, compress_level=1)  # much faster than the default on noisy images, still lossless (docs/data.md)
  else:
    im.save(path)


def _save_mask(mask: np.ndarray, path: str, value: int) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(mask.astype(np.uint8) * np.uint8(value)).save(path)  # .png or .bmp: both lossless


# (split, kind, image float32 [S, S, 3] in [0, 1], mask bool [S, S] or None for normal images)
Example = tuple[str, str, np.ndarray, np.ndarray | None]


def _examples(category: str, spec: tex.Spec, size: int, num_train: int, num_good: int, num_anomalous: int,
              seed: int) -> Iterator[Example]:
  """One category's images, one at a time (a large --size never holds a category in memory).

  kind is "good" for normal images, else the defect type; anomalous kinds cycle through
  synth_defects.DEFECT_TYPES so each appears equally often.
  """
  for i in range(num_train):
    yield "train", "good", tex.render(spec, size, _rng(seed, category, 1, i)), None
  for i in range(num_good):
    yield "test", "good", tex.render(spec, size, _rng(seed, category, 2, i)), None
  for i in range(num_anomalous):
    r = _rng(seed, category, 3, i)
    kind = synth_defects.DEFECT_TYPES[i % len(synth_defects.DEFECT_TYPES)]
    img, mask = synth_defects.add_defect(tex.render(spec, size, r), kind, r, spec.gray)
    yield "test", kind, img, mask


def _write_mvtec(root: str, cat: str, gray: bool, examples: Iterator[Example]) -> None:
  counters: dict[tuple[str, str], int] = {}
  for split, kind, img, mask in examples:
    j = counters[split, kind] = counters.get((split, kind), -1) + 1
    _save(img, os.path.join(root, cat, split, kind, f"{j:03d}.png"), gray)
    if mask is not None:
      _save_mask(mask, os.path.join(root, cat, "ground_truth", kind, f"{j:03d}_mask.png"), 255)


def _write_visa(root: str, cat: str, examples: Iterator[Example]) -> list[list[str]]:
  """Writes the images (always RGB JPEG, as VisA ships them); returns the CSV rows."""
  rows, normal, anomaly = [], 0, 0
  for split, _, img, mask in examples:
    if mask is None:
      rel, mrel, normal = f"{cat}/Data/Images/Normal/{normal:04d}.JPG", "", normal + 1
    else:
      rel, mrel = f"{cat}/Data/Images/Anomaly/{anomaly:03d}.JPG", f"{cat}/Data/Masks/Anomaly/{anomaly:03d}.png"
      anomaly += 1
      _save_mask(mask, os.path.join(root, mrel), 1)
    _save(img, os.path.join(root, rel), gray=False)
    rows.append([cat, split, "normal" if mask is None else "anomaly", rel, mrel])
  return rows


def _write_btad(root: str, cat: str, gray: bool, examples: Iterator[Example], quirk: int) -> None:
  ext, mext = _BTAD_EXTS[quirk]
  counters: dict[tuple[str, str], int] = {}
  for split, kind, img, mask in examples:
    folder = "ok" if mask is None else "ko"
    j = counters[split, folder] = counters.get((split, folder), -1) + 1
    _save(img, os.path.join(root, cat, split, folder, f"{j:04d}{ext}"), gray)
    if mask is not None:
      _save_mask(mask, os.path.join(root, cat, "ground_truth", "ko", f"{j:04d}{mext}"), 255)


def expand_categories(names: Sequence[str]) -> list[str]:
  """Category names, with "source", "target" and "all" expanded; unknown names raise."""
  known = SOURCE_CATEGORIES + TARGET_CATEGORIES
  out: list[str] = []
  for n in names:
    group = {"source": SOURCE_CATEGORIES, "target": TARGET_CATEGORIES, "all": known}.get(n, (n,))
    for c in group:
      if c not in known:
        raise ValueError(f"unknown synthetic category {c!r}; known: {', '.join(known)}")
      if c not in out:
        out.append(c)
  return out


def generate(layout: str, out_dir: str, categories: Sequence[str] = SOURCE_CATEGORIES, size: int = 256,
             num_good: int = 20, num_anomalous: int = 20, seed: int = 0, *, num_train: int | None = None,
             overwrite: bool = False) -> dict[str, tuple[int, int, int]]:
  """Writes a demo dataset; returns {category: (train, test normal, test anomalous)} counts.

  Args:
    layout: "mvtec", "visa" or "btad".
    out_dir: dataset root to write (created).
    categories: names from SOURCE_CATEGORIES / TARGET_CATEGORIES (or "source", "target", "all").
    size: image side in pixels (>= 32).
    num_good, num_anomalous: normal and anomalous test images per category.
    seed: everything is a function of it.
    num_train: normal training images per category (default num_good).
    overwrite: replace category folders that already exist (otherwise raise).
  """
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
  if size < 32:
    raise ValueError(f"size must be at least 32 pixels (defects need room), got {size}")
  cats = expand_categories(categories)
  num_train = num_good if num_train is None else num_train
  for cat in cats:
    path = os.path.join(out_dir, cat)
    if os.path.exists(path):
      if not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True / --overwrite to replace it)")
      shutil.rmtree(path)
  rows = []
  for q, cat in enumerate(cats):
    spec = tex.make_spec(cat, _rng(seed, cat, 0))
    examples = _examples(cat, spec, size, num_train, num_good, num_anomalous, seed)
    if layout == "mvtec":
      _write_mvtec(out_dir, cat, spec.gray, examples)
    elif layout == "visa":
      rows += _write_visa(out_dir, cat, examples)
    else:
      _write_btad(out_dir, cat, spec.gray, examples, q % 3)
    faults.pause_point("demo_data")  # tests kill the process here: a partly written dataset
  if layout == "visa":
    os.makedirs(os.path.join(out_dir, "split_csv"), exist_ok=True)
    with open(os.path.join(out_dir, "split_csv", "1cls.csv"), "w", newline="") as f:
      w = csv.writer(f, lineterminator="\n")
      w.writerow(["object", "split", "label", "image", "mask"])
      w.writerows(rows)
  return {c: (num_train, num_good, num_anomalous) for c in cats}


def ensure(layout: str, root: str, categories: Sequence[str], *, size: int, num_good: int, num_anomalous: int,
           seed: int) -> bool:
  """Makes `root` a complete demo dataset of these parameters; returns whether it wrote one.

  The data is generated into a temporary folder beside `root`, the marker file `MARKER` (with the
  parameters) written last, and the folder renamed to `root`: a kill at any moment leaves either
  no `root` or a complete one. A `root` without the marker (partly written by an older version) or
  with other parameters is regenerated; a temporary folder of a dead generator is removed.
  """
  params = {"layout": layout, "categories": expand_categories(categories), "size": size, "num_good": num_good,
            "num_anomalous": num_anomalous, "seed": seed}
  marker = os.path.join(root, MARKER)
  if os.path.isfile(marker):
    with open(marker) as f:
      try:
        if json.load(f) == params:
          return False
      except ValueError:
        pass
    log.warning("%s holds demo data of other parameters: regenerating it", root)
  elif os.path.isdir(root) and os.listdir(root):
    log.warning("%s holds incomplete demo data (no %s): regenerating it", root, MARKER)
  parent = os.path.dirname(os.path.abspath(root))
  os.makedirs(parent, exist_ok=True)
  for path in fileio.remove_stale_temps(parent):
    log.info("removed %s, left by an interrupted run", path)
  log.info("writing demo data (%s layout: %s) to %s", layout, ", ".join(params["categories"]), root)
  with fileio.atomic_dir(root) as tmp:
    generate(layout, tmp, categories, size=size, num_good=num_good, num_anomalous=num_anomalous, seed=seed,
             overwrite=True)
    fileio.atomic_write_json(os.path.join(tmp, MARKER), params)
  return True


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layout", required=True, choices=LAYOUTS)
  p.add_argument("--out", required=True, help="dataset root to write")
  p.add_argument("--categories", nargs="+", default=["source"],
                 help="category names, or source / target / all (default: source)")
  p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--num-good", type=int, default=20, help="normal test images per category")
  p.add_argument("--num-anomalous", type=int, default=20, help="anomalous test images per category")
  p.add_argument("--num-train", type=int, default=None, help="normal train images per category (default: --num-good)")
  p.add_argument("--overwrite", action="store_true", help="replace existing category folders")
  args = p.parse_args(argv)
  start = time.perf_counter()
  try:
    counts = generate(args.layout, args.out, args.categories, args.size, args.num_good, args.num_anomalous,
                      args.seed, num_train=args.num_train, overwrite=args.overwrite)
  except (ValueError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for cat, (tr, ok, ng) in counts.items():
    print(f"{cat:<10} train {tr:>4}  test good {ok:>4}  test anomalous {ng:>4}")
  print(f"wrote {args.layout} layout to {args.out} in {time.perf_counter() - start:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
