"""Train on MVTec-AD (its test split, with masks), evaluate zero-shot on VisA (paper Table 1).

    python -m ssvp_jax.train --config=configs/mvtec.py --workdir=runs/mvtec \\
        --config.backbones.semantic.bundle=weights/clip-vit-l14-336 \\
        --config.backbones.structural.bundle=weights/dinov3-vitl16 \\
        --config.train_data.root=/data/mvtec_anomaly_detection \\
        --config.eval_data.visa.root=/data/VisA_20220922
"""

from configs import base


def get_config():
  c = base.get_config()
  c.backbones.semantic.pos_interpolation = "bicubic"  # as Bayes-PFL, SSVP's direct base (SPEC section 1)
  c.train_data = base.dataset("mvtec", protocol="bayes_pfl")
  c.eval_data = base.ml_collections.ConfigDict({"visa": base.dataset("visa", protocol="bayes_pfl")})
  c.print_decisions = True
  return c
