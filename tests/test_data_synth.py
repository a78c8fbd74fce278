"""The demo-data generator: real layouts our readers accept, exact masks, determinism."""

import filecmp
import os

import numpy as np
import pytest
from PIL import Image

from ssvp_jax.data import synth, synth_defects
from ssvp_jax.data import synth_textures as tex
from ssvp_jax.data.datasets import read_dataset
from ssvp_jax.data.pipeline import load_image, load_mask

SMALL = dict(size=64, num_good=3, num_anomalous=4, num_train=2)  # 4 anomalies: one of each kind


def _files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


@pytest.mark.parametrize("layout, name", [("mvtec", "mvtec"), ("visa", "visa"), ("btad", "btad")])
def test_layouts_read_back_with_exact_masks(tmp_path, layout, name):
  cats = ["brick", "grid", "coffee"]  # a gray photo, a procedural texture, a colour photo
  counts = synth.generate(layout, str(tmp_path), cats, seed=3, **SMALL)
  assert counts == {c: (2, 3, 4) for c in cats}
  test = read_dataset(name, str(tmp_path), "test")
  train = read_dataset(name, str(tmp_path), "train")
  assert len(train) == 6 and all(r.label == 0 for r in train)
  for cat in cats:
    recs = [r for r in test if r.category == cat]
    assert sorted(r.label for r in recs) == [0] * 3 + [1] * 4
  for r in test:
    assert (r.mask_path is not None) == bool(r.label)  # masks exist exactly for anomalous images
    assert load_image(r.image_path).shape == (64, 64, 3)
    if r.label:
      m = load_mask(r.mask_path)
      assert m.shape == (64, 64)
      assert synth_defects.MIN_AREA <= m.mean() <= synth_defects.MAX_AREA
  if layout == "mvtec":
    assert {r.defect for r in test if r.label} == set(synth_defects.DEFECT_TYPES)
  if layout == "visa":  # VisA masks hold the value 1
    assert all(set(np.unique(np.asarray(Image.open(r.mask_path)))) == {0, 1}
               for r in test if r.label)
  if layout == "btad":  # category i copies BTAD class 0(i%3)+1's file types
    exts = {r.category: (os.path.splitext(r.image_path)[1], os.path.splitext(r.mask_path)[1])
            for r in test if r.label}
    assert exts == {"brick": (".bmp", ".png"), "grid": (".png", ".png"), "coffee": (".bmp", ".bmp")}


def test_defects_change_exactly_the_masked_region(tmp_path):
  synth.generate("mvtec", str(tmp_path), ["grid"], seed=0, size=64, num_good=1, num_anomalous=4, num_train=0)
  spec = tex.make_spec("grid", synth._rng(0, "grid", 0))
  for i, kind in enumerate(synth_defects.DEFECT_TYPES):
    # Re-render the normal image this defect was drawn on; outside the mask nothing changed.
    base = tex.render(spec, 64, synth._rng(0, "grid", 3, i))
    img = load_image(str(tmp_path / "grid" / "test" / kind / "000.png"))
    mask = load_mask(str(tmp_path / "grid" / "ground_truth" / kind / "000_mask.png"))
    outside = np.abs(img - np.round(base * 255) / 255).max(axis=2)[~mask]
    assert outside.max() < 1e-6, kind
    inside = np.abs(img - base).max(axis=2)[mask]
    assert inside.mean() >= synth_defects.MIN_CHANGE - 1 / 255, kind


def test_same_seed_same_bytes_and_categories_independent(tmp_path):
  a, b, c, d = (str(tmp_path / n) for n in "abcd")
  synth.generate("mvtec", a, ["dots", "brick"], seed=7, **SMALL)
  synth.generate("mvtec", b, ["dots", "brick"], seed=7, **SMALL)
  assert _files(a) == _files(b)
  match, mismatch, errors = filecmp.cmpfiles(a, b, _files(a), shallow=False)
  assert not mismatch and not errors and len(match) == 2 * (2 + 3 + 4 + 4)
  synth.generate("mvtec", c, ["dots", "brick"], seed=8, **SMALL)
  assert filecmp.cmpfiles(a, c, _files(a), shallow=False)[1]  # another seed, other images
  synth.generate("mvtec", d, ["brick"], seed=7, **SMALL)  # brick alone: the same brick bytes
  brick = [f for f in _files(a) if f.startswith("brick")]
  assert filecmp.cmpfiles(a, d, brick, shallow=False)[0] == brick


def test_source_and_target_families_are_disjoint():
  assert not set(synth.SOURCE_CATEGORIES) & set(synth.TARGET_CATEGORIES)
  fam = lambda c: tex.make_spec(c, synth._rng(0, c, 0)).family  # noqa: E731
  assert not {fam(c) for c in synth.SOURCE_CATEGORIES} & {fam(c) for c in synth.TARGET_CATEGORIES}
  assert synth.expand_categories(["target", "brick"]) == list(synth.TARGET_CATEGORIES) + ["brick"]


def test_cli(tmp_path, capsys):
  out = str(tmp_path / "demo")
  assert synth.main(["--layout", "btad", "--out", out, "--categories", "waves", "--size", "48",
                     "--num-good", "2", "--num-anomalous", "2", "--seed", "1"]) == 0
  assert "wrote btad layout" in capsys.readouterr().out
  assert len(read_dataset("btad", out)) == 4
  assert synth.main(["--layout", "btad", "--out", out, "--categories", "waves"]) == 2  # exists
  assert "exists" in capsys.readouterr().err
  assert synth.main(["--layout", "mvtec", "--out", out, "--categories", "marble"]) == 2
  assert "unknown synthetic category 'marble'" in capsys.readouterr().err
