"""Zero-shot evaluation: maps and scores per category, metrics, and the report files.

    python -m ssvp_jax.evaluate --config=configs/demo.py --workdir=runs/demo

evaluates the latest checkpoint in the work directory on every `config.eval_data` entry and
writes `eval/results.{json,csv,md}` and overlay PNGs there. Training runs the same code at its end.
`--shots=K` runs the few-shot protocol instead (ssvp_jax/fewshot.py, docs/reference_bank.md).
"""

from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from ssvp_jax import maps as maps_lib
from ssvp_jax import (checkpoint, config_upgrade, distributed, fileio, functional, metrics, optim, report, sharding,
                      validate)
from ssvp_jax.build import build_model
from ssvp_jax.data import splits
from ssvp_jax.data.pipeline import iterate_batches, load_image, resize_image, views
from ssvp_jax.errors import UserError
from ssvp_jax.models.prompts import templates_for
from ssvp_jax.models.ssvp import SSVP, TRAINABLE
from ssvp_jax.models.vtam import final_score, local_score

log = logging.getLogger("ssvp_jax")


def eval_step(model: SSVP, semantic_images, structural_images, t_init, size: int, sigma: float):
  """Deterministic (z = mu) maps at the input resolution and the three image scores.

  Jit it with the model bound: `functional.Bound(eval_step, model)(ci, di, t_init, size=, sigma=)`.
  """
  return head_outputs(model, model.features(semantic_images, structural_images), t_init, size, sigma)


def head_outputs(model: SSVP, feats, t_init, size: int, sigma: float):
  """The heads on frozen features: (map [B, S, S], s_global, s_local, s_final [B]), as `eval_step`."""
  out = model.heads(feats, t_init, deterministic=True)
  amap = maps_lib.postprocess(out.p_map, size, sigma)
  vtam = model.vtam
  if vtam.top_k is None:
    return amap, out.s_global, out.s_local, out.s_final
  # D9: at test time S_local is the mean of the top-k values of the map that is scored (Bayes-PFL).
  s_local = local_score(amap.reshape(amap.shape[0], -1), vtam.top_k)
  return amap, out.s_global, s_local, final_score(out.s_global, s_local, vtam.gamma)


def _minmax(x: np.ndarray) -> np.ndarray:
  span = x.max() - x.min()
  return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def image_scores(s_global: np.ndarray, s_local: np.ndarray, s_final: np.ndarray, gamma: float, norm: str
                 ) -> np.ndarray:
  """Eq. 19 as computed (D15 "none"), or Bayes-PFL's transductive per-class min-max (D15 "minmax")."""
  if norm == "none":
    return s_final
  if norm == "minmax":
    return (1 - gamma) * _minmax(s_global) + gamma * _minmax(s_local)
  raise ValueError(f"config.eval.score_norm must be 'none' or 'minmax', got {norm!r}")


def predict_records(model: SSVP, tokenizer, config: ml_collections.ConfigDict, records, desc: str = "eval"
                    ) -> dict[str, np.ndarray]:
  """Runs the model over `records`; returns per-record maps [N, S, S] and scores [N] (record order)."""

  categories = sorted({r.category for r in records})
  templates = templates_for(model, tokenizer, categories, config)
  table = functional.Bound(SSVP.prompt_table, model)((templates.ids, templates.eot))
  table = sharding.to_host(table)  # [C, P, E], small; indexed on the host below
  mesh = sharding.model_mesh(model)  # None: a model `sharding.shard_model` never placed
  cls = np.array([categories.index(r.category) for r in records], np.int32)
  size = config.backbones.semantic.image_size
  n = len(records)
  out = {"maps": np.zeros((n, size, size), np.float32), "masks": np.zeros((n, size, size), bool),
         "s_global": np.zeros(n, np.float32), "s_local": np.zeros(n, np.float32),
         "s_final": np.zeros(n, np.float32), "has_mask": np.zeros(n, bool)}
  step = functional.Bound(eval_step, model)
  batches = iterate_batches(records, views(config), batch_size=config.eval.batch_size, pad_remainder=True,
                            mask_size=size, num_threads=config.data.workers)
  total = -(-n // config.eval.batch_size)
  for batch in tqdm(batches, total=total, desc=desc, unit="batch", dynamic_ncols=True, leave=False,
                    disable=not distributed.is_main()):
    idx = batch["index"]
    inputs = (batch["semantic"], batch["structural"], table[cls[np.maximum(idx, 0)]])
    if mesh is not None:  # examples split over the mesh's data axis; every process holds the whole batch
      inputs = sharding.shard_batch(inputs, mesh, what="--config.eval.batch_size")
    amap, sg, sl, sf = step(*inputs, size=size, sigma=float(config.eval.sigma))
    amap, sg, sl, sf = (sharding.to_host(x) for x in (amap, sg, sl, sf))
    keep = batch["valid"]
    i = idx[keep]
    out["maps"][i] = np.asarray(amap)[keep]
    out["masks"][i] = batch["mask"][keep] > 0.5
    out["has_mask"][i] = batch["has_mask"][keep]
    for k, v in (("s_global", sg), ("s_local", sl), ("s_final", sf)):
      out[k][i] = np.asarray(v)[keep]
  return out


def evaluate_records(model: SSVP, tokenizer, config: ml_collections.ConfigDict, records, dataset: str,
                     out_dir: str | None) -> dict[str, dict[str, float]]:
  """Per-category metrics of one dataset; overlays under `out_dir/overlays/<dataset>/<category>/`.

  One category at a time, so that only its maps are held in memory (a VisA category's test maps at
  518 px are ~0.2 GB; the whole dataset's would be ~2.3 GB).
  """
  results = {}
  for cat in sorted({r.category for r in records}):
    cat_records = [r for r in records if r.category == cat]
    pred = predict_records(model, tokenizer, config, cat_records, desc=f"{dataset}/{cat}")
    labels = np.array([r.label for r in cat_records], np.int32)
    scores = image_scores(pred["s_global"], pred["s_local"], pred["s_final"], config.vtam.gamma,
                          config.eval.score_norm)
    img = metrics.image_metrics(labels, scores)
    # Anomalous images without a mask (datasets that ship none) cannot enter pixel metrics.
    has = pred["has_mask"]
    pix = metrics.pixel_metrics(pred["masks"][has], pred["maps"][has])
    results[cat] = report.category_entry(img, pix)
    if out_dir and config.eval.overlays > 0:
      _write_overlays(cat_records, pred, labels, config, os.path.join(out_dir, "overlays", dataset, cat))
  return results


def _write_overlays(records, pred, labels, config, out_dir) -> None:
  # Anomalous images first, then normal ones, up to config.eval.overlays per category.
  order = sorted(range(len(records)), key=lambda i: (-labels[i], i))[:config.eval.overlays]
  os.makedirs(out_dir, exist_ok=True)
  size = config.backbones.semantic.image_size
  for i in order:
    rec = records[i]
    image = resize_image(load_image(rec.image_path), size)
    name = f"{rec.defect}_{os.path.splitext(os.path.basename(rec.image_path))[0]}.png"
    report.save_overlay(os.path.join(out_dir, name), image, pred["maps"][i],
                        mask=pred["masks"][i] if rec.label else None, vmin=0.0, vmax=1.0, panel=True)


def evaluate_datasets(config: ml_collections.ConfigDict, model: SSVP, tokenizer, workdir: str,
                      out_name: str = "eval") -> dict[str, dict[str, dict[str, float]]]:
  """Evaluates every `config.eval_data` entry; writes `workdir/<out_name>/results.*`; returns the results."""
  out_dir = os.path.join(workdir, out_name)
  main = distributed.is_main()  # every process evaluates; process 0 writes
  if main:
    os.makedirs(out_dir, exist_ok=True)
  results = {}
  for key, ds in config.eval_data.items():
    records = splits.read_split(ds, workdir, f"eval_data.{key}")
    log.info("evaluating %s: %d images of %d categories", key, len(records), len({r.category for r in records}))
    results[key] = evaluate_records(model, tokenizer, config, records, key, out_dir if main else None)
  if main:
    report.write_reports(results, out_dir)
    log.info("reports written to %s", out_dir)
  return results


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a work directory was trained with (`workdir/config.json`, written by training)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing: {workdir} is not a trained work directory "
                            "(train with `python -m ssvp_jax.train --config=... --workdir=...`)")
  with open(path) as f:
    try:
      stored = json.load(f)
    except ValueError as e:
      raise UserError(f"{path}: not valid JSON ({e}); see config_history.jsonl beside it") from None
  return ml_collections.ConfigDict(config_upgrade.upgrade(stored, path))


def load_trained(config: ml_collections.ConfigDict, workdir: str, move_bad: bool = False):
  """(model, tokenizer) with the heads of the newest intact checkpoint in `workdir` (`move_bad`: move a
  damaged newer one aside, as training does; only under the work directory's lock)."""
  model, tokenizer = build_model(config)
  if jax.device_count() > 1:  # place it as training did (one device: the same arrays either way)
    sharding.shard_model(model, sharding.make_mesh(sharding.mesh_config(config)), sharding.mesh_config(config))
  # The checkpoint holds the optimiser state too; restoring it whole keeps one code path.
  optimizer = optim.make_optimizer(model, config.optim, 1, TRAINABLE)
  mgr = checkpoint.manager(workdir)
  try:
    meta = checkpoint.restore(mgr, model, optimizer, TRAINABLE, move_bad=move_bad)
  finally:
    mgr.close()
  if meta is None:
    raise FileNotFoundError(f"{os.path.join(workdir, 'checkpoints')}: no checkpoint; train first with "
                            f"`python -m ssvp_jax.train --config=... --workdir={workdir}`")
  log.info("loaded the heads of step %s from %s", meta.get("step"), workdir)
  return model, tokenizer


def main(argv) -> None:
  del argv
  from ssvp_jax.cli import FLAGS, setup
  setup()
  # Without --config, evaluate with the config the work directory was trained with.
  config = FLAGS.config if FLAGS.config is not None else load_config(FLAGS.workdir)
  validate.check(config, FLAGS.workdir, train=False)
  fileio.WorkdirLock(FLAGS.workdir, "evaluation").acquire()  # until exit: not while a training writes here
  if FLAGS.shots is not None:
    return _fewshot_main(config, FLAGS.workdir, FLAGS.shots)
  if FLAGS.untrained:  # the baseline: the same model before training (heads at initialisation)
    model, tokenizer = build_model(config)
    results = evaluate_datasets(config, model, tokenizer, FLAGS.workdir, out_name="eval_untrained")
  else:
    model, tokenizer = load_trained(config, FLAGS.workdir, move_bad=True)
    results = evaluate_datasets(config, model, tokenizer, FLAGS.workdir)
  print(report.format_markdown(results))
  shots = int(config.get("reference", {}).get("shots", 0))
  if shots and not FLAGS.untrained:  # as training ends (configs/demo.py)
    from ssvp_jax import fewshot  # imports this module (through reference)
    print(report.format_markdown(fewshot.evaluate_fewshot(config, model, tokenizer, FLAGS.workdir, shots, True)))


def _fewshot_main(config: ml_collections.ConfigDict, workdir: str, shots: int) -> None:
  """--shots=K: the few-shot protocol (ssvp_jax/fewshot.py), fused on a trained work directory,
  bank only on one that was never trained."""
  from ssvp_jax import fewshot, inference  # both import this module
  if shots < 1:
    raise UserError(f"--shots={shots}: give K >= 1 references per category")
  trained = os.path.isdir(os.path.join(workdir, "checkpoints")) and inference.checkpoint_step(workdir) is not None
  if trained:
    model, tokenizer = load_trained(config, workdir, move_bad=True)
  else:
    log.info("%s has no checkpoint: the bank alone (training-free), no zero-shot or fused rows", workdir)
    model, tokenizer = build_model(config)
  results = fewshot.evaluate_fewshot(config, model, tokenizer, workdir, shots, trained)
  print(report.format_markdown(results))


if __name__ == "__main__":
  from absl import flags
  from ssvp_jax import cli  # defines --config, --workdir and --verbose
  flags.DEFINE_bool("untrained", False, "Evaluate the freshly initialised heads (the before-training "
                    "baseline) into workdir/eval_untrained instead of the trained checkpoint.")
  flags.DEFINE_integer("shots", None, "Few-shot protocol: K good references per category from the normal "
                       "training images, config.reference.seeds seeds, into workdir/eval_{K}shot (bank only "
                       "when the work directory has no checkpoint) instead of the zero-shot evaluation. "
                       "Without it, config.reference.shots > 0 adds those rows after the zero-shot ones.")
  cli.run(main)
