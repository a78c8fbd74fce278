"""Tiling: coverage and blending, one tile equals the whole-image path, and a 12-px defect on a 2048-px
image that the whole-image resize erases and the tiles resolve."""

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter
from sklearn.metrics import roc_auc_score

from ssvp_jax import inference, predict, tiling


@pytest.mark.parametrize("length,tile,overlap", [(100, 30, 5), (30, 30, 0), (20, 30, 4), (2048, 84, 12), (61, 30, 29)])
def test_tiles_cover_every_pixel_and_blend_to_a_partition_of_unity(length, tile, overlap):
  t = min(tile, length)
  starts = tiling.origins(length, t, min(overlap, t - 1))
  assert starts[0] == 0 and starts[-1] + t == length and all(b > a for a, b in zip(starts, starts[1:]))
  assert all(b - a <= t - min(overlap, t - 1) for a, b in zip(starts, starts[1:]))
  win = tiling.window(t, overlap)
  total = np.zeros(length)
  for s in starts:
    total[s:s + t] += win
  assert total.min() > 0  # every pixel gets weight; a constant map stitches back to itself
  if overlap:
    assert win[0] == pytest.approx(0.5 / overlap, rel=1e-6)
    assert (win[t // 2] == 1.0) == (t >= 2 * overlap)


def test_bad_tile_arguments_are_refused():
  with pytest.raises(ValueError, match="--overlap"):
    tiling.check_args(64, 64)
  with pytest.raises(ValueError, match="--tile"):
    tiling.check_args(0, 0)


def test_one_tile_is_the_whole_image_path(engine, tmp_path):  # noqa: F811
  image = np.random.default_rng(0).random((40, 40, 3)).astype(np.float32)
  Image.fromarray((image * 255).astype(np.uint8)).save(tmp_path / "a.png")
  rows = predict.predict(engine, [str(tmp_path / "a.png")], str(tmp_path / "whole"), batch_size=2)
  tiled = predict.predict(engine, [str(tmp_path / "a.png")], str(tmp_path / "tiled"), batch_size=2, tile=64)
  whole_map, tiled_map = np.load(rows[0]["map"]), np.load(tiled[0]["map"])
  assert whole_map.shape == (28, 28) and tiled_map.shape == (40, 40)  # tiled: the image's full resolution
  np.testing.assert_allclose(tiled_map, inference.resize_hw(whole_map, 40, 40, Image.Resampling.BILINEAR),
                             atol=1e-5)
  assert float(tiled[0]["s_global"]) == pytest.approx(float(rows[0]["s_global"]), abs=1e-5)
  assert float(tiled[0]["s_local"]) == pytest.approx(tiled_map.max(), abs=1e-6)


def test_tiles_find_a_small_defect_that_the_whole_image_resize_erases(engine, tmp_path):  # noqa: F811
  """A 12-px defect on a 2048-px texture, scored with a reference bank of good tiles of the same texture
  (the tiny test model's zero-shot heads have trained 8 steps: their maps say little). Resized whole,
  the defect is a sixth of a pixel and the map cannot see it; cut into 84-px tiles it covers a patch."""
  def texture(seed):
    bg = gaussian_filter(np.random.default_rng(seed).standard_normal((n, n)), 2.0)
    return np.repeat((0.5 + 0.08 * bg / bg.std())[:, :, None], 3, axis=2).astype(np.float32)

  n, y, x = 2048, 1200, 700
  good = texture(1)
  refs = []
  for i, (gy, gx) in enumerate([(0, 0), (500, 900), (1500, 300), (900, 1700)]):  # good tiles, tile-sized
    refs.append(str(tmp_path / f"ref{i}.png"))
    Image.fromarray((good[gy:gy + 84, gx:gx + 84] * 255).astype(np.uint8)).save(refs[-1])
  bank, used, _ = inference.bank_from_files(engine, refs, batch_size=4, workers=1)
  assert len(used) == 4
  engine = engine.with_bank(bank, {"num_references": len(used)})  # fused at config.reference.weight
  image = texture(0)
  image[y:y + 12, x:x + 12] = 0.0
  mask = np.zeros((n, n), bool)
  mask[y:y + 12, x:x + 12] = True
  clip, dino = engine.preprocess(image)
  whole = inference.resize_hw(engine.forward(clip[None], dino[None])["map"][0], n, n, Image.Resampling.BILINEAR)
  tiled = tiling.score_image(engine, image, tile=84, overlap=12, batch_size=32)
  auroc_whole = roc_auc_score(mask.ravel(), whole.ravel())
  auroc_tiled = roc_auc_score(mask.ravel(), tiled["map"].ravel())
  print(f"P-AUROC on the 2048 px image: whole-image resize {auroc_whole:.3f}, tiles 84/12 {auroc_tiled:.3f}")
  assert tiled["tiles"] == 29 ** 2 and tiled["map"].shape == (n, n)
  assert auroc_whole < 0.7 and auroc_tiled > 0.9
