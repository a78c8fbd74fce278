"""A seconds-long config for tests: tiny random backbones, tiny demo data.

    python -m ssvp_jax.train --config=configs/tiny.py --workdir=/tmp/ssvp_tiny
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import base  # noqa: E402


def get_config():
  c = base.get_config()
  c.clip.random_init = "tiny"
  c.clip.image_size = 28       # patch 7 -> 4 x 4 tokens
  c.clip.layers = (1, 2)
  c.dino.random_init = "tiny"
  c.dino.image_size = 16       # patch 4 -> 4 x 4 tokens
  c.dino.layers = (1, 2)
  c.model.atf_heads, c.model.atf_head_dim = 2, 4
  c.model.latent_dim, c.model.latent_tokens = 6, 2
  c.model.n_background, c.model.n_state = 2, 2

  c.train_data = base.dataset("mvtec", "{workdir}/data/source")
  c.train_data.synth.update(layout="mvtec", categories=("brick", "grating"), size=32, num_good=4,
                            num_anomalous=4, seed=0)
  target = base.dataset("visa", "{workdir}/data/target")
  target.synth.update(layout="visa", categories=("gravel", "dots"), size=32, num_good=3, num_anomalous=3, seed=1)
  c.eval_data = base.ml_collections.ConfigDict({"target": target})

  c.optim.epochs = 2
  c.optim.batch_size = 4
  c.eval.batch_size = 4
  c.eval.sigma = 1.0
  c.eval.overlays = 1
  c.data.workers = 0
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  return c
