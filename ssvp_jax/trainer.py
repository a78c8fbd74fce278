"""Training: `train_and_evaluate(config, workdir)`, the jitted step, logging and checkpoints.

The CLI in `ssvp_jax/train.py` only parses flags and calls `train_and_evaluate`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import platform
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint
from flax import nnx
from tqdm import tqdm

from ssvp_jax import (__version__, cache, checkpoint, decisions, distributed, evaluate, fewshot, fileio, functional,
                      losses, maps, optim, reference, resume, sharding, validate)
from ssvp_jax.build import build_model
from ssvp_jax.data import splits
from ssvp_jax.data.pipeline import views
from ssvp_jax.models.prompts import templates_for
from ssvp_jax.models.ssvp import FROZEN, SSVP, TRAINABLE

log = logging.getLogger("ssvp_jax")


def seg_maps(out, size: int, loss_cfg) -> tuple[list[jax.Array], list[bool]]:
  """The maps L_seg supervises at the mask's resolution, and which of them are logits.

  D20 (default): each scale's logit (M_a - M_n) / tau upsampled bilinearly (the lineage upsamples
  logits before the softmax); alternative: probabilities clipped, turned into logits, upsampled.
  D17 (default): the fused P_map too, upsampled bilinearly as evaluation does (a gated sum of
  probabilities, no logit of its own); alternative: the scales only.
  """
  if loss_cfg.get("direct_logits", False):
    scale = [maps.upsample(x, size) for x in out.scale_logits]
    flags = [True] * len(scale)
  else:
    scale = [maps.upsample_probs(p, size) for p in out.scale_probs]
    flags = [False] * len(scale)
  if loss_cfg.get("supervise_fused", False):
    scale.append(maps.upsample(out.p_map, size))
    flags.append(False)
  return scale, flags


def loss_fn(model: SSVP, batch: dict, templates: tuple[jax.Array, jax.Array], key: jax.Array,
            loss_cfg: ml_collections.ConfigDict) -> tuple[jax.Array, losses.LossTerms]:
  """Eq. 22 on one batch; the VAE noise comes from `key` only.

  `batch["mask_weight"]` [B] (when present) is 0 for anomalous images without a mask: they
  train the image loss only.
  """
  # With the feature cache on, the batch brings the frozen features (ssvp_jax/cache.py).
  feats = batch["features"] if "features" in batch else model.features(batch["semantic"], batch["structural"])
  t_init = model.prompt_table(templates)[batch["class_index"]]  # [B, P, E]
  out = model.heads(feats, t_init, rngs=nnx.Rngs(sample=key), deterministic=False)
  # Losses in float32 whatever the compute dtype (config.dtype, D21): bf16 logs lose too much near 0 and 1.
  out = jax.tree.map(lambda x: x.astype(jnp.float32), out)
  seg, flags = seg_maps(out, batch["mask"].shape[-1], loss_cfg)
  terms = losses.total_loss(seg, batch["mask"], out.s_final, batch["label"].astype(jnp.float32), out.l_vae,
                            out.l_reg, lambda1=loss_cfg.lambda_vae, lambda2=loss_cfg.lambda_reg,
                            focal_gamma=loss_cfg.focal_gamma, use_dice=loss_cfg.dice,
                            form=loss_cfg.get("seg_form", "mean"), logits=flags,
                            mask_weight=batch.get("mask_weight"))
  return terms.total, terms


@functools.partial(jax.jit, static_argnums=(0, 6))
def _train_step(graphdef, frozen, state, batch, templates, key, loss_cfg):
  """One optimiser step on the trainable parameters; the backbones get no gradient."""
  model, optimizer = nnx.merge(graphdef, frozen, state)
  grad_fn = nnx.grad(loss_fn, argnums=nnx.DiffState(0, TRAINABLE), has_aux=True)
  grads, terms = grad_fn(model, batch, templates, key, loss_cfg)
  optimizer.update(model, grads)
  sharding.constrain(model, optimizer)  # updated state keeps the shardings of the rules
  return nnx.split((model, optimizer), FROZEN, ...)[2], terms


class TrainStep:
  """The jitted training step over the state of (model, optimizer), split once (ssvp_jax/functional.py).

  The frozen backbones are split off at construction and passed to every step unchanged; the
  trainable parameters and the optimiser state go in and come back updated (`state`). `model` and
  `optimizer` themselves are NOT updated by a step: checkpoints read `checkpoint_state()`, the
  live state; `sync()` writes the state into the objects and must run before the objects
  themselves are used (evaluation, returning them).
  """

  def __init__(self, model: SSVP, optimizer: nnx.Optimizer):
    self.model, self.optimizer = model, optimizer
    self.graphdef, self.frozen, self.state = nnx.split((model, optimizer), FROZEN, ...)

  def __call__(self, batch: dict, templates, key: jax.Array, loss_cfg) -> losses.LossTerms:
    """Eq. 22 on `batch`, one optimiser update; `loss_cfg` a FrozenConfigDict (static)."""
    self.state, terms = _train_step(self.graphdef, self.frozen, self.state, batch, templates, key, loss_cfg)
    return terms

  def checkpoint_state(self) -> nnx.State:
    """The live state as `checkpoint.trainable_state(model, optimizer, TRAINABLE)` lays it out (the
    on-disk tree), without touching `model` or `optimizer`."""
    model_state, opt_state = self.state[0], self.state[1]  # the split of (model, optimizer), frozen removed
    return nnx.State({"params": nnx.filter_state(model_state, TRAINABLE), "opt": opt_state})

  def sync(self) -> None:
    """Writes the current state into `model` and `optimizer` (before using those objects)."""
    nnx.update((self.model, self.optimizer), self.state)


def _feature_pass(model: SSVP, mesh, batch_size: int):
  """(this process's semantic rows, structural rows) -> their Features as NumPy: the backbones run once over the
  global batch that all processes' rows form (a collective call; the feature cache fills itself with it)."""
  run = functional.Bound(SSVP.features, model)
  rows = distributed.process_rows(batch_size)

  def features(semantic_images: np.ndarray, structural_images: np.ndarray):
    out = run(*sharding.shard_batch((semantic_images, structural_images), mesh, process_local=True))
    return jax.tree.map(lambda x: sharding.to_host(x)[rows], out)

  return features


def _nbytes(model: SSVP, optimizer: nnx.Optimizer) -> int:
  """Bytes of the trainable parameters and the optimiser state: what a checkpoint holds."""
  leaves = jax.tree.leaves((nnx.state(model, TRAINABLE), nnx.state(optimizer)))
  return sum(int(x.nbytes) for x in leaves if hasattr(x, "nbytes"))


def _versions() -> dict[str, str]:
  return {"ssvp_jax": __version__, "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "orbax-checkpoint": orbax.checkpoint.__version__, "numpy": np.__version__,
          "python": platform.python_version(), "backend": jax.default_backend()}


def _write_run_files(config: ml_collections.ConfigDict, workdir: str, changes: dict, step: int) -> None:
  """config.json (+ a config_history.jsonl line, ssvp_jax/resume.py) and versions.json, atomically."""
  resume.record(config, workdir, changes, step)
  fileio.atomic_write_json(os.path.join(workdir, "versions.json"), _versions())


def workdir_lock(workdir: str, what: str):
  """The work directory's exclusive lock (ssvp_jax/fileio.py), held by process 0 of a multi-process run."""
  return fileio.WorkdirLock(workdir, what) if distributed.is_main() else contextlib.nullcontext()


class _Logger:
  """Scalars to TensorBoard event files and to `log.jsonl` (one JSON object per line).

  `step`: the step the run resumes from; lines and events written after it (by the run that was
  interrupted) are dropped, so no step appears twice.
  """

  def __init__(self, workdir: str, step: int = 0):
    from tensorboardX import SummaryWriter  # slow to import: only a training run writes logs
    resume.trim_log(os.path.join(workdir, "log.jsonl"), step)
    self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=step + 1 if step else None)
    self.jsonl = open(os.path.join(workdir, "log.jsonl"), "a")

  def write(self, step: int, scalars: dict[str, float]) -> None:
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)
    self.jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
    self.jsonl.flush()

  def close(self) -> None:
    self.tb.close()
    self.jsonl.close()


def train(config: ml_collections.ConfigDict, workdir: str, stop_after_step: int | None = None
          ) -> tuple[SSVP, Any, dict[str, Any]]:
  """Trains the heads (resuming from the newest intact checkpoint in `workdir`); returns (model, tokenizer,
  summary).

  The config is checked first (ssvp_jax/validate.py), the work directory locked, and a resume must
  keep the stored config's meaning (ssvp_jax/resume.py), all before anything is written.
  `stop_after_step` ends the run early after that step's checkpoint (used to test resumption).
  """
  validate.check(config, workdir, train=True)
  os.makedirs(workdir, exist_ok=True)
  with workdir_lock(workdir, "training"):
    changes = resume.check(config, workdir)
    return _train(config, workdir, changes, stop_after_step)


def _train(config: ml_collections.ConfigDict, workdir: str, changes: dict, stop_after_step: int | None
           ) -> tuple[SSVP, Any, dict[str, Any]]:
  main = distributed.is_main()  # only process 0 writes files, logs and the progress bar
  if main and config.get("print_decisions"):  # the paper configs: protocol, class words, D1-D22 (log + config.json)
    decisions.announce(config)
  mesh = sharding.make_mesh(sharding.mesh_config(config))
  model, tokenizer = build_model(config)
  sharding.shard_model(model, mesh, sharding.mesh_config(config))

  records = splits.read_split(config.train_data, workdir, "train_data")
  categories = sorted({r.category for r in records})
  cat_index = {c: i for i, c in enumerate(categories)}
  class_of_record = np.array([cat_index[r.category] for r in records], np.int32)
  # An anomalous image without a mask must not teach "no defect here" to L_seg (weight 0).
  mask_weight_of_record = np.array([float(r.mask_path is not None or r.label == 0) for r in records], np.float32)
  templates = templates_for(model, tokenizer, categories, config)
  tmpl = (jnp.asarray(templates.ids), jnp.asarray(templates.eot))

  bs = config.optim.batch_size
  steps_per_epoch = len(records) // bs
  if steps_per_epoch == 0:
    raise ValueError(f"{len(records)} training images are fewer than one batch of {bs}: lower "
                     "--config.optim.batch_size")
  total_steps = config.optim.epochs * steps_per_epoch
  if bs % mesh.shape["data"] or bs % jax.process_count():
    raise ValueError(f"--config.optim.batch_size={bs} does not split over the mesh's {mesh.shape['data']} data "
                     f"devices and {jax.process_count()} processes: use a multiple of both")
  optimizer = sharding.place(optim.make_optimizer(model, config.optim, total_steps, TRAINABLE), mesh)
  n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, TRAINABLE)))
  log.info("training %d images of %d categories (%s), %d steps of %d; %s trainable parameters",
           len(records), len(categories), config.train_data.name, total_steps, bs, f"{n_train:,}")
  no_mask = int(np.sum(mask_weight_of_record == 0))
  log.info("%d of %d training images are anomalous without a mask: they train the image loss only",
           no_mask, len(records))

  mgr = checkpoint.manager(workdir, config.keep_checkpoints)
  try:
    meta = checkpoint.restore(mgr, model, optimizer, TRAINABLE)
    step = int(meta["step"]) if meta else 0
    if main:
      validate.check_disk(workdir, _nbytes(model, optimizer) + (16 << 20), "a checkpoint")
      _write_run_files(config, workdir, changes, step)
  except BaseException:
    mgr.close()  # orbax's threads must not outlive a refused start
    raise
  if meta:
    log.info("resumed from the checkpoint of step %d in %s", step, workdir)
  base_key = jax.random.key(config.seed)
  loss_cfg = ml_collections.FrozenConfigDict(config.loss)  # hashable: a static argument of the step
  feature_cache = cache.from_config(config, workdir, model, views(config))  # None when disabled
  train_step = TrainStep(model, optimizer)
  features = _feature_pass(model, mesh, bs) if feature_cache is not None else None
  logger = _Logger(workdir, step) if main else None
  last_terms = None
  try:
    with tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
              disable=not main) as bar:
      for epoch in range(step // steps_per_epoch, config.optim.epochs):
        skip = step - epoch * steps_per_epoch  # batches of this epoch already trained before a resume
        if feature_cache is not None:  # same order; decodes and runs the backbones only for missing entries
          batches = feature_cache.batches(features, records, views(config), batch_size=bs, seed=config.seed,
                                          epoch=epoch, skip=skip, num_threads=config.data.workers)
        else:
          # This process's rows of each global batch (all of them in a one-process run).
          batches = distributed.train_batches(records, views(config), batch_size=bs, seed=config.seed, epoch=epoch,
                                              num_threads=config.data.workers)
        for i, batch in enumerate(batches):
          if i < skip:
            continue
          batch = {k: v for k, v in batch.items() if k not in ("valid", "has_mask")}
          batch["class_index"] = class_of_record[batch["index"]]
          batch["mask_weight"] = mask_weight_of_record[batch["index"]]  # 0: trains the image loss only
          batch = sharding.shard_batch(batch, mesh, process_local=True)  # examples split over `data`
          terms = train_step(batch, tmpl, jax.random.fold_in(base_key, step), loss_cfg)
          step += 1
          total = float(terms.total)
          if not math.isfinite(total):
            raise FloatingPointError(f"loss is {total} at step {step} (epoch {epoch + 1}); terms: "
                                     + ", ".join(f"{k}={float(v):.4g}" for k, v in terms._asdict().items()))
          last_terms = {f"loss/{k}": float(v) for k, v in terms._asdict().items()}
          bar.update(1)
          bar.set_postfix(loss=f"{total:.4f}", epoch=epoch + 1)
          if logger is not None and (step % config.log_every_steps == 0 or step == total_steps):
            logger.write(step, {**last_terms, "epoch": epoch + 1,
                                "lr/prompt": float(optim.schedule(config.optim.lr_prompt, total_steps,
                                                                  config.optim.warmup_frac)(step))})
          if step % config.checkpoint_every_steps == 0 or step == total_steps:
            checkpoint.save(mgr, step, train_step.checkpoint_state(), {"step": step, "epoch": epoch + 1})
          if stop_after_step is not None and step >= stop_after_step:
            train_step.sync()  # the returned model is used (evaluated) by the caller
            return model, tokenizer, {"step": step, "stopped_early": True, **(last_terms or {})}
  finally:
    mgr.wait_until_finished()
    mgr.close()
    if logger is not None:
      logger.close()
  train_step.sync()  # the returned model is evaluated next (train_and_evaluate)
  return model, tokenizer, {"step": step, "total_steps": total_steps, **(last_terms or {})}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains on `config.train_data`, then evaluates zero-shot on every `config.eval_data` entry.

  With config.reference.shots = K > 0 the few-shot protocol follows (ssvp_jax/fewshot.py,
  workdir/eval_{K}shot). Returns {"train": summary, "results": dataset -> category -> metric,
  "fewshot": the few-shot rows, or None}.
  """
  validate.check(config, workdir, train=True)
  os.makedirs(workdir, exist_ok=True)
  with workdir_lock(workdir, "training"):  # through the evaluations at the end
    model, tokenizer, summary = train(config, workdir)
    results = evaluate.evaluate_datasets(config, model, tokenizer, workdir)
    shots = reference.settings(config).shots
    few = fewshot.evaluate_fewshot(config, model, tokenizer, workdir, shots, trained=True) if shots else None
  return {"train": summary, "results": results, "fewshot": few}
