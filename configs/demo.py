"""The embedded demo: runs anywhere in a few minutes on 2 CPU cores, nothing to download.

    python -m ssvp_jax.train --config=configs/demo.py --workdir=runs/demo

Writes demo data with the generator (ssvp_jax.data.synth) into the work directory if absent:
source categories in the MVTec layout for training, disjoint target categories in the VisA
layout for zero-shot evaluation. No pretrained weights can be downloaded here, so both backbones
are small and randomly initialised (the "small" presets of ssvp_jax/models/clip.py and dinov3.py:
width 96, 4 blocks, patch 8 at 112 px, 14 x 14 tokens): the demo shows the whole pipeline learning to transfer, not
the paper's numbers. The heads use SPEC's revised defaults (D3, D7-D9, D11, D17-D21); the demo
changes only what it owns (sizes, taps, epochs, learning rates, batch). With backbones this
small the frozen features cost little, so the feature cache is off; `configs/demo_vitb.py` keeps
the ViT-B/16-shaped variant on which the cache pays (bench/bench_train.py).
"""

from configs import base

SOURCE = ("brick", "grass", "grating", "checkers")
TARGET = ("gravel", "stone", "grid", "dots")


def get_config():
  c = base.get_config()
  c.backbones.semantic.random_init = "small"
  c.backbones.semantic.image_size = 112      # patch 8 -> 14 x 14 tokens
  c.backbones.semantic.layers = (1, 2, 3, 4)
  c.backbones.structural.random_init = "small"
  c.backbones.structural.image_size = 112      # patch 8 -> 14 x 14 tokens
  c.backbones.structural.layers = (1, 2, 3, 4)
  c.hsvs.num_heads, c.hsvs.head_dim = 4, 16
  c.vcpg.latent_dim = 32      # D8: 8 latent tokens of 4

  c.train_data = base.dataset("mvtec", "{workdir}/data/source")
  c.train_data.synth.update(layout="mvtec", categories=SOURCE, seed=0)
  target = base.dataset("visa", "{workdir}/data/target")
  target.synth.update(layout="visa", categories=TARGET, seed=1)
  c.eval_data = base.ml_collections.ConfigDict({"demo_target": target})

  target.synth.update(num_good=20, num_anomalous=20)  # 160 held-out images: a steadier estimate

  # Heads trained from scratch on random features need far more than the paper's 1e-4/5e-4
  # (measured against 1e-3/5e-3 and a diverging 2e-2: docs/fidelity.md, "Learning rates of the demo").
  c.optim.lr, c.optim.lr_prompt = 1e-2, 2e-2
  c.optim.epochs = 15
  c.optim.batch_size = 8
  c.eval.sigma = 2.0           # 8 px at 518 px corresponds to ~2 px at 112 px
  c.eval.overlays = 4
  # Few-shot rows after the zero-shot evaluation (ssvp_jax/fewshot.py): 4 good training images per
  # held-out category as a reference bank, 3 seeds; mutual scoring as its own (transductive) row.
  c.reference.shots = 4
  c.reference.mutual = True
  # Fusion weight 0.5: best PRO on this demo, AUROCs within a point of the best; the ViT-B-shaped
  # demo preferred 0.8 (base.py's default): each keeps its own (measured, docs/reference_bank.md).
  c.reference.weight = 0.5
  c.log_every_steps = 5
  c.checkpoint_every_steps = 50
  return c
