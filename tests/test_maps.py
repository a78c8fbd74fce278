"""maps: the upsampling and smoothing matrices equal the library operations they replace."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ssvp_jax import maps


@pytest.mark.parametrize("h,w,size", [(4, 4, 28), (14, 14, 224), (37, 37, 518), (3, 5, 7), (4, 4, 4), (16, 16, 6)])
def test_upsample_equals_jax_image_resize(h, w, size):
  x = np.random.default_rng(h * w).random((2, h, w)).astype(np.float32)
  ref = jax.image.resize(jnp.asarray(x), (2, size, size), "bilinear")  # antialiased when reducing
  np.testing.assert_allclose(np.asarray(maps.upsample(jnp.asarray(x), size)), np.asarray(ref), atol=1e-5)  # float32 rounding


@pytest.mark.parametrize("h,size", [(4, 28), (14, 224), (5, 13)])
def test_upsample_equals_torch_align_corners_false(h, size):
  x = np.random.default_rng(h).random((2, h, h)).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.from_numpy(x)[:, None], size=(size, size), mode="bilinear",
                                        align_corners=False)[:, 0].numpy()
  np.testing.assert_allclose(np.asarray(maps.upsample(jnp.asarray(x), size)), ref, atol=2e-6)


def test_upsample_probs_interpolates_logits_and_clips_saturated_pixels():
  """D20 "clipped": bilinear on the logits (torch's sigmoid(interpolate(logit))), 0 and 1 held at 1e-6 away."""
  x = np.random.default_rng(1).random((2, 4, 4)).astype(np.float32)
  x[0, 0, 0], x[1, 3, 3] = 0.0, 1.0
  p = np.clip(x, 1e-6, 1 - 1e-6)
  ref = torch.sigmoid(torch.nn.functional.interpolate(torch.from_numpy(np.log(p) - np.log1p(-p))[:, None],
                                                      size=(9, 9), mode="bilinear", align_corners=False))[:, 0]
  out = np.asarray(maps.upsample_probs(jnp.asarray(x), 9))
  np.testing.assert_allclose(out, ref.numpy(), atol=1e-5)
  assert out.min() > 0 and out.max() < 1 and np.isfinite(out).all()


def test_smooth_equals_scipy():
  from scipy.ndimage import gaussian_filter
  x = np.random.default_rng(0).random((2, 30, 30)).astype(np.float32)
  ref = np.stack([gaussian_filter(m, 2.5, mode="reflect") for m in x])
  np.testing.assert_allclose(np.asarray(maps.smooth(jnp.asarray(x), 2.5)), ref, atol=2e-6)
