"""calibrate: the conformal and F1 thresholds, the stored record, and the false-alarm rate it delivers."""

import json
import os

import numpy as np
import pytest
from scipy import stats

from helpers.tiny import copy_workdir, run_python, target_records
from ssvp_jax import calibrate, inference
from ssvp_jax.data import synth


def test_conformal_threshold_picks_the_right_order_statistic():
  scores = np.random.default_rng(0).permutation(np.arange(1.0, 100.0))  # 99 distinct scores 1..99
  thr, rank = calibrate.conformal_threshold(scores, 0.05)
  assert (thr, rank) == (95.0, 95)  # ceil(100 * 0.95): 5 of 99 good images flagged, 5/100 expected on new ones
  assert np.sum(scores >= thr) == 5
  assert calibrate.conformal_threshold(scores, 0.5) == (50.0, 50)
  thr, rank = calibrate.conformal_threshold(scores[:10], 0.05)  # 10 images cannot certify 5 %
  assert rank == 11 and thr > scores[:10].max() and np.sum(scores[:10] >= thr) == 0
  for far in (0.0, 1.0, -0.1):
    with pytest.raises(ValueError, match="false-alarm rate"):
      calibrate.conformal_threshold(scores, far)
  with pytest.raises(ValueError, match="finite"):
    calibrate.conformal_threshold([0.1, np.nan], 0.1)


def test_f1_threshold_by_hand():
  res = calibrate.f1_threshold([0.1, 0.2, 0.3, 0.6], [0.5, 0.7, 0.8])
  # Cuts 0.8, 0.7, 0.6, 0.5, 0.3: F1 = 1/2, 4/5, 2/3, 6/7, 3/4 -> cut at 0.5, halfway down to 0.3.
  assert res["threshold"] == pytest.approx(0.4) and res["f1"] == pytest.approx(6 / 7)
  assert (res["true_positives"], res["false_positives"], res["false_negatives"]) == (3, 1, 0)
  sep = calibrate.f1_threshold([0.0, 0.1], [0.9, 1.0])
  assert sep["f1"] == 1.0 and sep["threshold"] == pytest.approx(0.5)
  # Equal F1 at two cuts: the higher one (fewer false alarms) wins.
  tie = calibrate.f1_threshold([0.5, 0.4], [0.9, 0.1])  # cut 0.9: F1 2/3; cut 0.1: 4/6 = 2/3
  assert tie["threshold"] == pytest.approx(0.7)
  with pytest.raises(ValueError, match="good and defective"):
    calibrate.f1_threshold([0.1], [])


def _good_images(root, n, seed):
  """n good demo images of two target categories (interleaved), all from one distribution."""
  synth.generate("mvtec", root, ["dots", "gravel"], size=32, num_good=n // 2, num_anomalous=0, num_train=0,
                 seed=seed)
  return [os.path.join(root, c, "test", "good", f) for c in ("dots", "gravel")
          for f in sorted(os.listdir(os.path.join(root, c, "test", "good")))]


def test_false_alarm_rate_on_held_out_good_images(trained_workdir, engine, tmp_path, tmp_path_factory):  # noqa: F811
  far, n = 0.1, 300
  paths = _good_images(str(tmp_path / "good"), 2 * n, seed=7)
  rng = np.random.default_rng(0)
  order = rng.permutation(len(paths))
  cal_dir = tmp_path / "cal"
  cal_dir.mkdir()
  for i in order[:n]:  # a random half calibrates, the other half is held out
    os.symlink(paths[i], cal_dir / f"{i:04d}.png")
  held_out = [paths[i] for i in order[n:]]
  workdir = copy_workdir(trained_workdir, str(tmp_path / "wd"))
  res = run_python(["-m", "ssvp_jax.calibrate", f"--workdir={workdir}", f"--good={cal_dir}", f"--far={far}",
                    "--batch_size=4"], tmp_path_factory)
  assert res.returncode == 0, res.stderr[-3000:]
  assert f"rests on {n} good images" in res.stdout
  rec = calibrate.load_calibration(workdir)
  assert rec["method"] == "good_quantile" and rec["num_good"] == n and rec["rank"] == 271  # ceil(301 * 0.9)
  # calibrate also stored the good images' reference bank: held-out images are scored as predict
  # scores them, fused with it (the thresholds rest on leave-one-out fused scores).
  scorer = inference.load_engine(workdir)
  assert scorer.bank is not None and rec["reference"]["num_references"] == n
  results = list(inference.score_files(scorer, held_out, batch_size=4))
  # With a conformal threshold the held-out count is beta-binomial (m, n + 1 - rank, rank): the false-alarm
  # probability at the threshold is Beta(n + 1 - rank, rank) distributed. Accept its central 99.9 %.
  m = len(held_out)
  for what, values, thr, rank in (
      ("image", [r.score for r in results], rec["image_threshold"], rec["rank"]),
      ("pixel (map maxima)", [r.map.max() for r in results], rec["pixel_threshold"], rec["pixel_rank"])):
    values = np.asarray(values)
    assert np.unique(values).size > 0.9 * m  # continuous scores: the beta-binomial law applies
    flagged = int(np.sum(values >= thr))
    dist = stats.betabinom(m, n + 1 - rank, rank)
    lo, hi = dist.ppf(0.0005), dist.ppf(0.9995)
    print(f"{what}: held-out false-alarm rate {flagged / m:.3f} (requested {far}; accepted {lo / m:.3f}..{hi / m:.3f})")
    assert lo <= flagged <= hi, what


def test_f1_calibration_on_labelled_demo_images(engine, trained_workdir, tmp_path):  # noqa: F811
  records = target_records(trained_workdir)
  good = [r.image_path for r in records if r.label == 0]
  defective = [r.image_path for r in records if r.label == 1]
  broken = tmp_path / "broken.png"
  broken.write_text("not an image")
  rec = calibrate.calibrate(engine, good + [str(broken)], defective, far=0.2, batch_size=4)
  assert rec["method"] == "f1_optimal"
  assert (rec["num_good"], rec["num_defective"]) == (len(good), len(defective))
  assert len(rec["failed"]) == 1 and str(broken) in rec["failed"][0]
  g = np.array([r.score for r in inference.score_files(engine, good, batch_size=4)])
  d = np.array([r.score for r in inference.score_files(engine, defective, batch_size=4)])
  tp, fp = int(np.sum(d >= rec["image_threshold"])), int(np.sum(g >= rec["image_threshold"]))
  assert (tp, fp) == (rec["defective_detected"], rec["good_false_alarms"])
  assert rec["f1"] == pytest.approx(2 * tp / (tp + len(defective) + fp))
  assert f"{len(good)} good + {len(defective)} defective images" in rec["summary"][0]
  assert "1 files could not be read" in rec["summary"][-1]

  path = calibrate.save_calibration(str(tmp_path), rec)
  assert calibrate.load_calibration(str(tmp_path)) == json.loads(open(path).read())
  assert calibrate.load_calibration(str(tmp_path / "nowhere")) is None
  with open(path, "w") as f:
    f.write("{broken")
  with pytest.raises(ValueError, match="calibration.json: not valid JSON"):
    calibrate.load_calibration(str(tmp_path))
