"""Decision thresholds from a user's own images, stored in the work directory for predict and export.

    python -m ssvp_jax.calibrate --workdir=runs/demo --good=DIR [--defective=DIR] [--far=0.05]

Known-good images only: the image threshold is the split-conformal (1 - far) quantile of their scores,
the ceil((n + 1)(1 - far))-th smallest of n: on new good images from the same source an image is then
called defective (score >= threshold) with probability between far - 1/(n + 1) and far on average.
With known-defective images too, the image threshold is the F1-optimal one (defective = positive),
placed halfway between the lowest score called defective and the next lower score.
The pixel threshold (the contour on overlays) is always the same conformal quantile of the good images'
map maxima: about a fraction `far` of good images show any contour. Everything, including how many
images each threshold rests on, goes to `workdir/calibration.json`. Files that cannot be read are
skipped and listed; the exit status is then 1 (the calibration is still written), else 0.

The good images also become the category's reference bank (ssvp_jax/reference.py), written to
`workdir/reference/<category>.npz` with a fingerprint of the backbone weights and resolution; predict
and export then fuse it with the zero-shot scores, and the thresholds above are computed on those fused
scores, each good image scored leave-one-out (without its own patches). `--no_reference` skips it.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
from typing import Any, Sequence

import numpy as np
from absl import app
from tqdm import tqdm

from ssvp_jax import fileio, inference, reference

log = logging.getLogger("ssvp_jax")

DEFAULT_FAR = 0.05


def conformal_threshold(scores: Sequence[float], far: float) -> tuple[float, int]:
  """(threshold, rank): the rank-th smallest score, rank = ceil((n + 1)(1 - far)) (1-based).

  Decisions are `score >= threshold`. When rank > n (fewer than 1/far - 1 scores) no order statistic
  reaches `far`: the threshold is then just above the largest score (rank n + 1), and the expected
  false-alarm rate is 1/(n + 1) instead.
  """
  if not 0.0 < far < 1.0:
    raise ValueError(f"the false-alarm rate must be in (0, 1), got {far}")
  s = np.sort(np.asarray(scores, np.float64))  # [n] ascending
  if s.size == 0 or not np.isfinite(s).all():
    raise ValueError(f"need finite scores to calibrate, got {s.size} scores")
  rank = math.ceil((s.size + 1) * (1.0 - far) - 1e-9)  # the epsilon keeps (n+1)(1-far) = 95.0000001 at 95
  if rank > s.size:
    return float(np.nextafter(s[-1], np.inf)), s.size + 1
  return float(s[rank - 1]), rank


def f1_threshold(good: Sequence[float], defective: Sequence[float]) -> dict[str, float]:
  """The F1-optimal image threshold (defective = positive) with its counts on these images.

  Every distinct score is a candidate cut; ties in F1 go to the highest cut (fewer false alarms). The
  threshold sits halfway between the lowest score called defective and the next lower score, so the
  decisions on these images are the cut's and new images meet a margin on both sides.
  """
  good, defective = np.asarray(good, np.float64), np.asarray(defective, np.float64)
  if good.size == 0 or defective.size == 0:
    raise ValueError(f"F1 needs good and defective scores, got {good.size} and {defective.size}")
  scores = np.concatenate([good, defective])
  labels = np.concatenate([np.zeros(good.size, bool), np.ones(defective.size, bool)])
  order = np.argsort(-scores, kind="stable")                     # [N] descending
  s, y = scores[order], labels[order]
  last = np.r_[s[1:] != s[:-1], True]                            # last index of each run of ties
  tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]               # [K] flagged at each distinct cut
  f1 = 2 * tp / (2 * tp + fp + (defective.size - tp))            # (P + flagged) > 0 always
  best = int(np.flatnonzero(f1 == f1.max())[0])                  # first = highest cut among ties
  cut = s[last][best]
  lower = s[last][best + 1] if best + 1 < last.sum() else None   # next lower distinct score
  threshold = cut if lower is None else 0.5 * (cut + lower)
  if lower is not None and not lower < threshold <= cut:  # adjacent floats: the midpoint rounds onto one
    threshold = cut
  return {"threshold": float(threshold), "f1": float(f1[best]), "true_positives": int(tp[best]),
          "false_positives": int(fp[best]), "false_negatives": int(defective.size - tp[best])}


def _score(engine: inference.Engine, paths: Sequence[str], what: str, batch_size: int, workers: int,
           owners: Sequence[int] | None = None):
  scores, maxima, failed = [], [], []
  for r in tqdm(inference.score_files(engine, paths, batch_size, workers, owners=owners), total=len(paths),
                desc=what, unit="img", dynamic_ncols=True, leave=False):
    if r.error:
      log.error("skipped: %s", r.error)
      failed.append(r.error)
    else:
      scores.append(r.score)
      maxima.append(float(r.map.max()))
  return np.array(scores), np.array(maxima), failed


def calibrate(engine: inference.Engine, good: Sequence[str], defective: Sequence[str] = (), far: float = DEFAULT_FAR,
              batch_size: int = 8, workers: int = 4, owners: Sequence[int] | None = None) -> dict[str, Any]:
  """Scores the image files and returns the calibration record (see the module docstring).

  Files that cannot be decoded are skipped and counted (`failed`); at least one good image must score.
  When the engine has a bank built from the good images, `owners` gives each good file's image index
  in it, so each is scored leave-one-out (against the other good images, as a new image would be).
  """
  if not good:
    raise ValueError("no good images to calibrate on")
  g_scores, g_max, g_failed = _score(engine, good, "good", batch_size, workers, owners)
  d_scores, _, d_failed = _score(engine, defective, "defective", batch_size, workers) if defective else (
      np.zeros(0), None, [])
  if g_scores.size == 0:
    raise ValueError(f"none of the {len(good)} good images could be read")
  if defective and d_scores.size == 0:
    raise ValueError(f"none of the {len(defective)} defective images could be read")
  n, m = int(g_scores.size), int(d_scores.size)
  pix, pix_rank = conformal_threshold(g_max, far)
  rec: dict[str, Any] = {
      "category": engine.category, "checkpoint_step": engine.step, "far": far,
      "num_good": n, "num_defective": m, "failed": g_failed + d_failed,
      "pixel_threshold": pix, "pixel_rank": pix_rank, "reference": _bank_summary(engine),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  if m:
    f1 = f1_threshold(g_scores, d_scores)
    rec.update(method="f1_optimal", image_threshold=f1.pop("threshold"), **f1)
  else:
    thr, rank = conformal_threshold(g_scores, far)
    rec.update(method="good_quantile", image_threshold=thr, rank=rank)
  rec["good_false_alarms"] = int(np.sum(g_scores >= rec["image_threshold"]))
  if m:
    rec["defective_detected"] = int(np.sum(d_scores >= rec["image_threshold"]))
  rec["summary"] = describe(rec)
  return rec


def _bank_summary(engine: inference.Engine) -> dict[str, Any] | None:
  """What calibration.json says about the bank the scores were fused with (None: zero-shot scores)."""
  if engine.bank is None:
    return None
  return {k: engine.bank_meta.get(k) for k in ("path", "num_references", "weight", "fingerprint")}


def store_bank(engine: inference.Engine, workdir: str, good: Sequence[str], batch_size: int, workers: int
               ) -> tuple[inference.Engine, list[int] | None]:
  """Builds the category's reference bank from the good images and writes it to the work directory
  (`reference.bank_path`, atomically); returns (engine scoring with it, each good file's owner index).

  Fewer than 2 readable good images make no bank (no image to score one against): the engine comes
  back unchanged, and an older bank of the category is removed so that predict cannot pair it with
  these thresholds.
  """
  path = reference.bank_path(workdir, engine.category)
  bank, used, _ = inference.bank_from_files(engine, good, batch_size, workers)
  if bank is None or len(used) < 2:
    log.warning("no reference bank: it needs at least 2 readable good images, got %d", len(used))
    remove_bank(path)
    return engine, None
  meta = {"fingerprint": reference.fingerprint(engine.model, engine.config), "category": engine.category,
          "num_references": len(used), "files": used, "weight": float(reference.settings(engine.config).weight),
          "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  reference.save_bank(path, bank, meta)
  log.info("reference bank of %d good images written to %s", len(used), path)
  index = {p: i for i, p in enumerate(used)}
  return engine.with_bank(bank, {**meta, "path": path}), [index.get(p, -1) for p in good]


def remove_bank(path: str) -> None:
  if os.path.isfile(path):
    os.remove(path)
    log.info("removed the older reference bank %s", path)


def _ordinal(k: int) -> str:
  return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


def describe(rec: dict[str, Any]) -> list[str]:
  """Human-readable lines: each threshold and how many images it rests on."""
  n, m, far = rec["num_good"], rec["num_defective"], rec["far"]
  lines = []
  if rec["method"] == "f1_optimal":
    lines.append(f"image threshold {rec['image_threshold']:.6g}: F1-optimal on {n} good + {m} defective images "
                 f"(F1 {rec['f1']:.3f}; on these images {rec['good_false_alarms']}/{n} false alarms, "
                 f"{rec['defective_detected']}/{m} defective found)")
  elif rec["rank"] > n:
    lines.append(f"image threshold {rec['image_threshold']:.6g}: above all {n} good scores; {n} good images are "
                 f"too few for a false-alarm rate of {far:g} (that needs at least {math.ceil(1 / far) - 1}), "
                 f"the expected rate is 1/{n + 1} = {1 / (n + 1):.3g}")
  else:
    lines.append(f"image threshold {rec['image_threshold']:.6g}: rests on {n} good images, the "
                 f"{_ordinal(rec['rank'])} smallest score; expected false-alarm rate on new good images "
                 f"{(n + 1 - rec['rank']) / (n + 1):.3g} (requested {far:g})")
  k = rec["pixel_rank"]
  where = "above all of them" if k > n else f"the {_ordinal(k)} smallest"
  share = (n + 1 - k) / (n + 1) if k <= n else 1 / (n + 1)
  lines.append(f"pixel threshold {rec['pixel_threshold']:.6g}: from the map maxima of {n} good images ({where}); "
               f"about {share:.3g} of good images show a contour")
  if rec.get("reference"):
    lines.append(f"scores fused with the reference bank of {rec['reference']['num_references']} good images "
                 f"({rec['reference']['path']}, weight {rec['reference']['weight']:g}); each good image scored "
                 "without its own patches")
  if rec["failed"]:
    lines.append(f"{len(rec['failed'])} files could not be read and were skipped")
  return lines


def save_calibration(workdir: str, rec: dict[str, Any]) -> str:
  """Writes `workdir/calibration.json` (atomically); returns its path."""
  path = os.path.join(workdir, inference.CALIBRATION_FILE)
  fileio.atomic_write_json(path, rec)
  return path


def load_calibration(workdir: str) -> dict[str, Any] | None:
  """The calibration of `workdir`, or None when it was never calibrated."""
  path = os.path.join(workdir, inference.CALIBRATION_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    try:
      rec = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e}); rerun python -m ssvp_jax.calibrate") from None
  for key in ("image_threshold", "pixel_threshold"):
    if not isinstance(rec.get(key), (int, float)):
      raise ValueError(f"{path}: {key!r} is missing or not a number; rerun python -m ssvp_jax.calibrate")
  return rec


def main(argv) -> int:
  del argv
  from ssvp_jax.cli import FLAGS, setup  # importing cli defines the command-line flags: entry points only
  setup()
  good = inference.expand_images([FLAGS.good])
  defective = inference.expand_images([FLAGS.defective]) if FLAGS.defective else []
  if not good:
    raise app.UsageError(f"--good={FLAGS.good}: no image files found", exitcode=2)
  if FLAGS.defective and not defective:
    raise app.UsageError(f"--defective={FLAGS.defective}: no image files found", exitcode=2)
  if set(good) & set(defective):
    raise app.UsageError("--good and --defective share files", exitcode=2)
  engine = inference.load_engine(FLAGS.workdir, FLAGS.category, FLAGS.config, use_reference=False)
  batch_size = FLAGS.batch_size or engine.config.eval.batch_size
  owners = None
  if FLAGS.no_reference:
    remove_bank(reference.bank_path(FLAGS.workdir, engine.category))
  else:
    engine, owners = store_bank(engine, FLAGS.workdir, good, batch_size, FLAGS.workers)
  rec = calibrate(engine, good, defective, FLAGS.far, batch_size, FLAGS.workers, owners)
  path = save_calibration(FLAGS.workdir, rec)
  print("\n".join(rec["summary"] + [f"written to {path}"]))
  return 1 if rec["failed"] else 0


if __name__ == "__main__":
  from absl import flags

  import ssvp_jax.cli  # --config, --workdir, --verbose; run()
  inference.define_flags()
  flags.DEFINE_string("good", None, "Folder (or glob) of known-good images.", required=True)
  flags.DEFINE_string("defective", None, "Optional folder (or glob) of known-defective images: the image "
                      "threshold becomes F1-optimal.")
  flags.DEFINE_bool("no_reference", False, "Do not build (and remove any older) reference bank of the good "
                    "images; thresholds then rest on the zero-shot scores alone.")
  flags.DEFINE_float("far", DEFAULT_FAR, "Requested false-alarm rate on good images (image threshold without "
                     "--defective; the pixel threshold always).")
  ssvp_jax.cli.run(main)
