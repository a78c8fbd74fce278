"""The demo with ViT-B/16-shaped random backbones at 224 px: the feature cache's speed benchmark.

    python -m ssvp_jax.train --config=configs/demo_vitb.py --workdir=runs/demo_vitb
    python bench/bench_train.py          # uses this config by default

configs/demo.py with both backbones in ViT-B/16's shape (the "demo" presets of the backbone modules) at
224 px and taps 3/6/9/12. This was configs/demo.py until the fidelity pass (issue 11), when the demo
went back to small backbones, which transfer better on random weights and run faster on 2 cores.
As at full size, the frozen backbones cost far more than the heads here, so the feature cache is on:
epoch 1 runs them and stores their features (bfloat16, ~2.3 MB per image under
WORKDIR/feature_cache), later epochs run only the heads.
"""

from configs import demo


def get_config():
  c = demo.get_config()
  for section in (c.backbones.semantic, c.backbones.structural):
    section.random_init = "demo"
    section.image_size = 224   # patch 16 -> 14 x 14 tokens
    section.layers = (3, 6, 9, 12)
  c.cache.enabled = True
  c.cache.dtype = "bfloat16"
  c.train_data.synth.size = 224
  c.eval_data.demo_target.synth.size = 224
  c.eval.sigma = 3.5           # 8 px at 518 px corresponds to ~3.5 px at 224 px
  return c
