"""Train on VisA (its test split), evaluate zero-shot on MVTec-AD, BTAD, KSDD2, RSDD, DAGM, DTD-Synthetic.

    python -m ssvp_jax.train --config=configs/visa.py --workdir=runs/visa \\
        --config.backbones.semantic.bundle=weights/clip-vit-l14-336 \\
        --config.backbones.structural.bundle=weights/dinov3-vitl16 \\
        --config.train_data.root=/data/VisA_20220922 \\
        --config.eval_data.mvtec.root=/data/mvtec_anomaly_detection --config.eval_data.btad.root=/data/BTAD \\
        --config.eval_data.ksdd2.root=/data/KSDD2 --config.eval_data.rsdd.root=/data/RSDD \\
        --config.eval_data.dagm.root=/data/DAGM2007 --config.eval_data.dtd.root=/data/DTD-Synthetic
"""

from configs import base


def get_config():
  c = base.get_config()
  c.backbones.semantic.pos_interpolation = "bicubic"
  c.train_data = base.dataset("visa", protocol="bayes_pfl")
  # Bayes-PFL's protocol for each target (ssvp_jax/data/protocols.py); `protocol="full"` gives the
  # publisher's split. RSDD: the pos/neg crops ("rail"), the form Bayes-PFL evaluates.
  c.eval_data = base.ml_collections.ConfigDict(
      {name: base.dataset(name, protocol="bayes_pfl") for name in ("mvtec", "btad", "ksdd2", "rsdd", "dagm", "dtd")})
  c.eval_data.rsdd.categories = ("rail",)
  c.print_decisions = True
  return c
