"""The few-shot protocol (issue 10): K good references per category, several seeds, mean and spread.

    python -m ssvp_jax.evaluate --config=configs/demo.py --workdir=runs/demo --shots=4

For every `config.eval_data` entry and category, `config.reference.seeds` seeds each draw K references
from the dataset's normal TRAINING images (MVTec-AD train/good, VisA split=train, ...; never from the
evaluated split) and build a bank (ssvp_jax/reference.py). One pass over the test images scores them
against every seed's bank. Rows of `workdir/eval_{K}shot/results.{json,csv,md}` (the layout of eval/):

  <dataset>/zero-shot           the trained heads alone (same numbers as eval/; trained work dirs only)
  <dataset>/bank-{K}shot        the bank alone (training-free: needs no trained heads)
  <dataset>/fused-{K}shot       (1 - w) zero-shot + w bank, w = config.reference.weight (trained only)
  <dataset>/mutual-transductive mutual scoring on the unlabelled test images (config.reference.mutual;
                                no reference at all, uses the whole test set: never a zero-shot number)

Bank and fused values are means over the seeds; `<metric>_std` holds their standard deviation
(population, over seeds). A dataset without normal training images is skipped with a warning.
"""

from __future__ import annotations

import logging
import os

import ml_collections
import numpy as np
from tqdm import tqdm

from ssvp_jax import distributed, functional, metrics, reference, report, sharding
from ssvp_jax.data import datasets, splits
from ssvp_jax.data.common import DatasetError
from ssvp_jax.data.pipeline import iterate_batches, views
from ssvp_jax.errors import UserError
from ssvp_jax.models.prompts import templates_for
from ssvp_jax.models.ssvp import SSVP

log = logging.getLogger("ssvp_jax")


def draw_references(candidates, k: int, seed: int, where: str) -> list:
  """K of a category's normal training records, drawn without replacement by `seed` (file order kept)."""
  if k < 1:
    raise UserError(f"--shots must be >= 1, got {k}")
  if k > len(candidates):
    raise UserError(f"{where}: --shots={k} references asked but only {len(candidates)} normal training "
                     "images exist; lower --shots")
  idx = np.sort(np.random.default_rng(seed).choice(len(candidates), size=k, replace=False))
  return [candidates[i] for i in idx]


def reference_layers(model: SSVP, config: ml_collections.ConfigDict, records) -> tuple[np.ndarray, ...]:
  """The selected, normalised taps of `records` (decoded as evaluation decodes): L' x [k, N, D]."""
  spec = reference.spec(config)
  run = functional.Bound(reference.selected_features, model)
  parts = []
  for batch in iterate_batches(records, views(config), batch_size=config.eval.batch_size, pad_remainder=True,
                               mask_size=config.backbones.semantic.image_size, num_threads=config.data.workers):
    out = run(batch["semantic"], batch["structural"], spec=spec)
    parts.append([np.asarray(x)[batch["valid"]] for x in out])
  return tuple(np.concatenate(p) for p in zip(*parts))


def normal_training_records(ds: ml_collections.ConfigDict, workdir: str, section: str):
  """The normal records of the dataset's training split, or None when it has no such split."""
  root = ds.root.replace("{workdir}", workdir)
  try:
    records = datasets.read_dataset(ds.name, root, "train", tuple(ds.categories) or None)
  except DatasetError as e:
    log.warning("config.%s: %s; no few-shot rows for it", section, e)
    return None
  return [r for r in records if r.label == 0]


def _mean_std(entries: list[dict[str, float]]) -> dict[str, float]:
  out = {}
  for k in entries[0]:
    v = np.array([e[k] for e in entries], np.float64)
    out[k] = float(np.mean(v))
    out[f"{k}_std"] = float(np.std(v))
  return out


def score_category(model: SSVP, config, test_records, references: list[list], t_init, desc: str
                   ) -> dict[str, np.ndarray]:
  """Maps and scores of one category's test images: one bank per seed (`references`: records per seed),
  the zero-shot outputs when t_init [P, E] is given, mutual scoring when config.reference.mutual."""
  ref = reference.settings(config)
  spec = reference.spec(config)
  size, sigma = config.backbones.semantic.image_size, float(config.eval.sigma)
  banks = tuple(reference.build_bank(reference_layers(model, config, r), spec, ref.coreset) for r in references)
  n = len(test_records)
  out = {"bank_maps": np.zeros((len(banks), n, size, size), np.float32),
         "bank_scores": np.zeros((len(banks), n), np.float32),
         "masks": np.zeros((n, size, size), bool), "has_mask": np.zeros(n, bool),
         "labels": np.array([r.label for r in test_records], np.int32)}
  if t_init is not None:
    out.update(zs_maps=np.zeros((n, size, size), np.float32), zs_scores=np.zeros(n, np.float32))
  feats = None
  run = functional.Bound(reference.step, model)
  mesh = sharding.model_mesh(model)
  batches = iterate_batches(test_records, views(config), batch_size=config.eval.batch_size, pad_remainder=True,
                            mask_size=size, num_threads=config.data.workers)
  host = lambda x, keep: np.asarray(sharding.to_host(x))[keep]  # noqa: E731
  for batch in tqdm(batches, total=-(-n // config.eval.batch_size), desc=desc, unit="batch", leave=False,
                    dynamic_ncols=True, disable=not distributed.is_main()):
    keep, idx = batch["valid"], batch["index"][batch["valid"]]
    t = None if t_init is None else np.broadcast_to(t_init, (len(keep),) + t_init.shape)
    inputs = (batch["semantic"], batch["structural"])
    if mesh is not None:
      inputs = sharding.shard_batch(inputs, mesh, what="--config.eval.batch_size")
    zs, per_bank, q = run(*inputs, t, banks, spec=spec, size=size, sigma=sigma, return_features=ref.mutual)
    for s, (m, sc) in enumerate(per_bank):
      out["bank_maps"][s, idx], out["bank_scores"][s, idx] = host(m, keep), host(sc, keep)
    if zs is not None:  # S_final (D15 "none"), as predict scores single images
      out["zs_maps"][idx], out["zs_scores"][idx] = host(zs[0], keep), host(zs[3], keep)
    if q is not None:
      feats = feats or [np.zeros((n,) + x.shape[1:], np.float32) for x in q]
      for f, x in zip(feats, q):
        f[idx] = host(x, keep)
    out["masks"][idx], out["has_mask"][idx] = batch["mask"][keep] > 0.5, batch["has_mask"][keep]
  if feats is not None:
    out["mutual_maps"], out["mutual_scores"] = reference.mutual_scores(feats, spec, ref.mutual_lowest, size, sigma)
  return out


def category_rows(pred: dict[str, np.ndarray], weight: float) -> dict[str, dict[str, float]]:
  """Report entries (zero-shot, bank, fused, mutual) from `score_category`'s arrays."""
  def entry(scores, maps):
    has = pred["has_mask"]
    return report.category_entry(metrics.image_metrics(pred["labels"], scores),
                                 metrics.pixel_metrics(pred["masks"][has], maps[has]))

  seeds = range(len(pred["bank_scores"]))
  rows = {"bank": _mean_std([entry(pred["bank_scores"][s], pred["bank_maps"][s]) for s in seeds])}
  if "zs_scores" in pred:
    rows["zero-shot"] = entry(pred["zs_scores"], pred["zs_maps"])
    rows["fused"] = _mean_std([entry(reference.fuse(pred["zs_scores"], pred["bank_scores"][s], weight),
                                     reference.fuse(pred["zs_maps"], pred["bank_maps"][s], weight)) for s in seeds])
  if "mutual_scores" in pred:
    rows["mutual"] = entry(pred["mutual_scores"], pred["mutual_maps"])
  return rows


def row_name(dataset: str, row: str, shots: int) -> str:
  return {"zero-shot": f"{dataset}/zero-shot", "bank": f"{dataset}/bank-{shots}shot",
          "fused": f"{dataset}/fused-{shots}shot", "mutual": f"{dataset}/mutual-transductive"}[row]


def evaluate_fewshot(config: ml_collections.ConfigDict, model: SSVP, tokenizer, workdir: str, shots: int,
                     trained: bool) -> dict[str, dict[str, dict[str, float]]]:
  """The few-shot protocol on every `config.eval_data` entry; writes `workdir/eval_{shots}shot/`."""
  ref = reference.settings(config)
  results: dict[str, dict[str, dict[str, float]]] = {}
  for key, ds in config.eval_data.items():
    test = splits.read_split(ds, workdir, f"eval_data.{key}")  # also writes demo data when asked to
    normals = normal_training_records(ds, workdir, f"eval_data.{key}")
    if normals is None:
      continue
    categories = sorted({r.category for r in test})
    table = None
    if trained:
      templates = templates_for(model, tokenizer, categories, config)
      table = np.asarray(sharding.to_host(
          functional.Bound(SSVP.prompt_table, model)((templates.ids, templates.eot))))  # [C, P, E]
    log.info("%d-shot evaluation of %s: %d categories, seeds 0..%d", shots, key, len(categories), ref.seeds - 1)
    rows_of: dict[str, dict[str, dict[str, float]]] = {}
    for c, cat in enumerate(categories):
      candidates = [r for r in normals if r.category == cat]
      refs = [draw_references(candidates, shots, seed, f"config.eval_data.{key} category {cat!r}")
              for seed in range(ref.seeds)]
      pred = score_category(model, config, [r for r in test if r.category == cat], refs,
                            None if table is None else table[c], f"{key}/{cat} {shots}-shot")
      rows = category_rows(pred, float(ref.weight))
      for row, entry in rows.items():
        rows_of.setdefault(row, {})[cat] = entry
    for row in ("zero-shot", "bank", "fused", "mutual"):
      if row in rows_of:
        results[row_name(key, row, shots)] = rows_of[row]
  if not results:
    log.warning("no dataset of config.eval_data has normal training images: no few-shot report written")
  elif distributed.is_main():
    out_dir = os.path.join(workdir, f"eval_{shots}shot")
    report.write_reports(results, out_dir)
    log.info("few-shot reports written to %s", out_dir)
  return results
