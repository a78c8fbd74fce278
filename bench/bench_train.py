"""Training throughput with and without the frozen-feature cache (ssvp_jax/cache.py), demo config.

    .venv/bin/python bench/bench_train.py                   # 3 epochs each way, demo config
    .venv/bin/python bench/bench_train.py --epochs 4 --steps 20 --workdir /tmp/bench_train
    .venv/bin/python bench/bench_train.py --config configs/tiny.py     # any config with demo data

Two measurements, both printed as one table with the ratios:

1. Step throughput (compute only, one batch already in memory, jitted, after a warm-up): the
   uncached train step (both backbones + heads + backward through the heads) against the cached
   one (heads only, features given). Images per second.
2. Real runs of `trainer.train` (decoding, pipeline, logging, one final checkpoint), once with
   `cache.enabled=False` and once with an empty cache: the wall time of epoch 1 (from the call of
   `train`, so it includes building the model, hashing the backbones and compiling) and the mean
   of the later epochs (from the step timestamps in log.jsonl). Target: later epochs at least 10x
   faster with the cache than without.

The machine's load average is printed beside the numbers: the timings are only as good as the
machine was quiet.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from ssvp_jax import cache, functional, optim, trainer  # noqa: E402
from ssvp_jax.build import build_model  # noqa: E402
from ssvp_jax.data import splits  # noqa: E402
from ssvp_jax.data.pipeline import iterate_batches, views  # noqa: E402
from ssvp_jax.models.prompts import templates_for  # noqa: E402
from ssvp_jax.models.ssvp import SSVP, TRAINABLE  # noqa: E402


def load_avg() -> str:
  return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def demo_config(epochs: int, path: str = os.path.join(ROOT, "configs", "demo_vitb.py")) -> ml_collections.ConfigDict:
  """The config at `path` (the demo's by default), timed per step, checkpointing only at the end."""
  spec = importlib.util.spec_from_file_location("bench_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.optim.epochs = epochs
  c.log_every_steps = 1             # a timestamp per step: epoch boundaries are exact
  c.checkpoint_every_steps = 10**9  # only the final checkpoint, in both runs alike
  return c


def step_throughput(config: ml_collections.ConfigDict, workdir: str, steps: int) -> dict[str, float]:
  """Images/s of the jitted train step with and without precomputed features (one batch reused)."""
  model, tokenizer = build_model(config)
  records = splits.read_split(config.train_data, workdir, "train_data")
  categories = sorted({r.category for r in records})
  t = templates_for(model, tokenizer, categories, config)
  tmpl = (jnp.asarray(t.ids), jnp.asarray(t.eot))
  bs = config.optim.batch_size
  batch = next(iterate_batches(records, views(config), batch_size=bs, shuffle=True, seed=0,
                               drop_remainder=True, num_threads=config.data.workers))
  cat = {c: i for i, c in enumerate(categories)}
  base = {"mask": batch["mask"], "label": batch["label"],
          "class_index": np.array([cat[records[i].category] for i in batch["index"]], np.int32)}
  feats = jax.tree.map(np.asarray, functional.Bound(SSVP.features, model)(batch["semantic"], batch["structural"]))
  variants = {"no cache": {**base, "semantic": batch["semantic"], "structural": batch["structural"]},
              "cache": {**base, "features": feats}}
  loss_cfg = ml_collections.FrozenConfigDict(config.loss)
  out = {}
  for name, b in variants.items():
    step = trainer.TrainStep(model, optim.make_optimizer(model, config.optim, 1000, TRAINABLE))
    key = jax.random.key(0)
    jax.block_until_ready(step(b, tmpl, key, loss_cfg))  # compile
    start = time.perf_counter()
    for s in range(steps):
      terms = step(b, tmpl, jax.random.fold_in(key, s), loss_cfg)
    jax.block_until_ready(terms)
    out[name] = steps * bs / (time.perf_counter() - start)
  return out


def epoch_times(config: ml_collections.ConfigDict, workdir: str) -> tuple[float, list[float]]:
  """(epoch 1 seconds from the `train` call, [later epochs' seconds]) of one real run."""
  start = time.time()
  trainer.train(config, workdir)
  steps = {}
  with open(os.path.join(workdir, "log.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      steps[row["step"]] = row["time"]
  records = splits.read_split(config.train_data, workdir, "train_data")
  per_epoch = len(records) // config.optim.batch_size
  ends = [steps[e * per_epoch] for e in range(1, config.optim.epochs + 1)]
  return ends[0] - start, list(np.diff(ends))


def dir_mb(path: str) -> float:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2**20


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=os.path.join(ROOT, "configs", "demo_vitb.py"),
                      help="config file; its train_data must be demo data the generator can write")
  parser.add_argument("--epochs", type=int, default=3, help="epochs per real run (>= 2)")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per step-throughput variant")
  parser.add_argument("--dtype", default="float32", choices=sorted(cache.DTYPES), help="cache storage dtype")
  parser.add_argument("--workdir", default="", help="scratch folder (default: a temporary one, removed)")
  args = parser.parse_args()
  if args.epochs < 2:
    parser.error("--epochs must be at least 2 (epoch 1 against the later ones)")

  scratch = args.workdir or tempfile.mkdtemp(prefix="bench_train_")
  os.makedirs(scratch, exist_ok=True)
  config = demo_config(args.epochs, args.config)
  config.train_data.root = os.path.join(scratch, "data", "source")  # one data set for every run
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__} ({jax.default_backend()}); load average at start {load_avg()}", flush=True)
  try:
    thr = step_throughput(config, scratch, args.steps)
    load_steps = load_avg()
    runs = {}
    for name, enabled in (("no cache", False), ("cache", True)):
      c = ml_collections.ConfigDict(config.to_dict())
      c.cache.enabled, c.cache.dtype = enabled, args.dtype
      c.cache.dir = os.path.join(scratch, "features")
      wd = os.path.join(scratch, "run_" + name.replace(" ", "_"))
      shutil.rmtree(wd, ignore_errors=True)
      shutil.rmtree(c.cache.dir, ignore_errors=True)  # the cached run starts cold
      runs[name] = epoch_times(c, wd)
      print(f"  {name}: done, load average {load_avg()}", flush=True)
    cache_mb = dir_mb(os.path.join(scratch, "features"))
    load_runs = load_avg()
  finally:
    if not args.workdir:
      shutil.rmtree(scratch, ignore_errors=True)

  print()
  print(f"{os.path.basename(args.config)}: {config.backbones.semantic.image_size} px, batch {config.optim.batch_size}, {args.epochs} epochs, "
        f"cache dtype {args.dtype}, cache size {cache_mb:.1f} MB")
  print(f"| measurement | no cache | cache | ratio (no cache / cache) |")
  print(f"|---|---|---|---|")
  print(f"| train step, images/s (compute only) | {thr['no cache']:.1f} | {thr['cache']:.1f} | "
        f"{thr['cache'] / thr['no cache']:.1f}x faster |")
  (e1_n, later_n), (e1_c, later_c) = runs["no cache"], runs["cache"]
  print(f"| epoch 1 wall time, s (incl. build + compile) | {e1_n:.2f} | {e1_c:.2f} | {e1_n / e1_c:.2f} |")
  print(f"| later epochs, mean wall time, s | {np.mean(later_n):.2f} | {np.mean(later_c):.2f} | "
        f"{np.mean(later_n) / np.mean(later_c):.1f}x faster |")
  print(f"| later epochs, each, s | {', '.join(f'{x:.2f}' for x in later_n)} | "
        f"{', '.join(f'{x:.2f}' for x in later_c)} | |")
  ratio = np.mean(later_n) / np.mean(later_c)
  print(f"\nlater epochs with the cache are {ratio:.1f}x faster than without (target >= 10x: "
        f"{'met' if ratio >= 10 else 'NOT met'}); epoch 1 / later epochs with the cache: "
        f"{e1_c / np.mean(later_c):.1f}x")
  print(f"load average: after step timing {load_steps}; after the runs {load_runs}")


if __name__ == "__main__":
  main()
