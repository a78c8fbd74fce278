"""A seconds-long config for tests: tiny random backbones, tiny demo data.

    python -m ssvp_jax.train --config=configs/tiny.py --workdir=/tmp/ssvp_tiny
"""

from configs import base


def get_config():
  c = base.get_config()
  c.backbones.semantic.random_init = "tiny"
  c.backbones.semantic.image_size = 28       # patch 7 -> 4 x 4 tokens
  c.backbones.semantic.layers = (1, 2)
  c.backbones.structural.random_init = "tiny"
  c.backbones.structural.image_size = 16       # patch 4 -> 4 x 4 tokens
  c.backbones.structural.layers = (1, 2)
  c.hsvs.num_heads, c.hsvs.head_dim = 2, 4
  c.vcpg.latent_dim, c.vcpg.latent_tokens = 6, 2
  c.prompts.n_background, c.prompts.n_state = 2, 2

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
