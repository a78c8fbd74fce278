"""Shared SSVP configuration: every equation's constant and every SPEC.md decision (D1-D16).

Variants (`mvtec.py`, `visa.py`, `demo.py`, `tiny.py`) import `get_config()` from here and change a
few fields. Every field can be overridden on the command line, e.g.

  python -m ssvp_jax.train --config=configs/mvtec.py --workdir=runs/mvtec \
      --config.optim.epochs=5 --config.model.fusion=concat
"""

import ml_collections

from ssvp_jax import reference


def dataset(name: str, root: str = "", categories: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """One dataset entry: a reader name of ssvp_jax.data.datasets, its root, the split, a category subset.

  `synth` (demo only) names a layout for the demo-data generator, which then writes the data
  into `root` when that folder is absent.
  """
  return ml_collections.ConfigDict(dict(
      name=name, root=root, split="test", categories=categories,
      synth=dict(layout="", categories=(), size=128, num_good=12, num_anomalous=12, seed=0)))


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # --- Frozen backbones (SPEC section 1). `bundle` is a folder written by convert/*.py; an empty
  # `bundle` with a `random_init` preset builds a randomly initialised backbone (demo and tests only).
  c.clip = ml_collections.ConfigDict(dict(
      bundle="",
      random_init="",            # "" (use bundle) or a preset name of ssvp_jax.models.clip
      image_size=518,
      layers=(6, 12, 18, 24),    # 1-based blocks tapped
      pos_interpolation="bilinear",
      local_tokens="raw",        # D3: "raw" residual stream + learned map | "value_value" (AnomalyCLIP)
  ))
  c.dino = ml_collections.ConfigDict(dict(
      bundle="",
      random_init="",
      image_size=592,
      layers=(6, 12, 18, 24),    # D2; the paper prints 3, 6, 9, 11
  ))

  # --- Trainable heads.
  # D_c (768 at full size) is CLIP's projection width, read from the backbone.
  c.model = ml_collections.ConfigDict(dict(
      fusion="atf",              # "atf" | "concat"   (Table 3 ablation)
      atf_heads=8, atf_head_dim=64, atf_shared=False,   # D1
      n_background=5, n_state=5, n_prompts=3,           # D4, Eq. 6
      class_words="readable",    # D4: "readable" category names | "object"
      vcpg=True,                 # Table 3 ablation: VCPG on/off
      latent_dim=128, latent_tokens=1,                  # D8
      beta=0.1, kl_reduction="sum", xi=0.85, prompt_ln=True,  # Eq. 9 (KL summed over latent dims), Eq. 12, D12
      gating=True,               # Table 3 ablation: VTAM gates on/off
      tau=0.07, learn_tau=False,                        # D7
      gamma=0.5,                 # Eq. 19
      s_local="max", s_local_topk=10,                   # D9
      s_global="prob",           # D6: "prob" | "cosine"
  ))

  # --- Losses (Eqs. 20-22).
  c.loss = ml_collections.ConfigDict(dict(
      lambda_vae=1.0, lambda_reg=0.5, focal_gamma=2.0,
      dice=False,                # D11
  ))

  # --- Optimiser (SPEC section 5).
  c.optim = ml_collections.ConfigDict(dict(
      epochs=15, batch_size=8,
      lr_prompt=5e-4, lr=1e-4, b1=0.5, b2=0.999,
      warmup_frac=0.1,           # D16
  ))

  # --- Data. Training uses the TEST split of the source dataset (the lineage's protocol).
  # A root may contain "{workdir}", replaced by the work directory.
  c.train_data = dataset("mvtec")
  # Zero-shot targets, keyed so that each can be overridden: --config.eval_data.visa.root=DIR.
  c.eval_data = ml_collections.ConfigDict({"visa": dataset("visa")})
  c.data = ml_collections.ConfigDict(dict(workers=2))   # decoding threads

  # --- Frozen-feature cache (ssvp_jax/cache.py): epoch 1 stores each training image's backbone
  # features, later epochs read them and run only the heads. Off by default because full-size
  # entries are large (~45 MB/image in float32, ~22 MB in 16 bits: 4 taps x 1369 x 1024 x 2).
  # Entries are content-addressed, so `dir` may be shared between runs (e.g. ~/.cache/ssvp_jax).
  c.cache = ml_collections.ConfigDict(dict(
      enabled=False,
      dir="{workdir}/feature_cache",   # "{workdir}" is replaced by the work directory
      dtype="float32",           # "float32" (losses identical to no cache) | "float16" | "bfloat16"
  ))

  # --- Evaluation (SPEC section 4).
  c.eval = ml_collections.ConfigDict(dict(
      batch_size=8,
      sigma=8.0,                 # D14
      score_norm="none",         # D15: "none" | "minmax" (transductive, Bayes-PFL)
      overlays=8,                # overlay PNGs written per category
  ))

  # --- Few-shot reference bank (ssvp_jax/reference.py, docs/reference_bank.md): K good images per
  # category as a patch memory bank, alone (training-free) or fused with the zero-shot map.
  # Every key and its default, with a comment each: ssvp_jax/reference.py DEFAULTS (shots=0: off).
  c.reference = ml_collections.ConfigDict(dict(reference.DEFAULTS))

  # --- Devices (ssvp_jax/sharding.py). A mesh of `data` x `model` devices (-1: all the devices the
  # other axis leaves); batches are split over `data`. Parameters follow the logical axis rules
  # of sharding.py (FSDP over `data`, tensor-parallel over `model`) when their switch is on, and
  # are replicated otherwise. One device runs the same code with a 1 x 1 mesh.
  c.mesh = ml_collections.ConfigDict(dict(
      data=-1, model=1,
      shard_backbones=False,     # frozen CLIP/DINOv3 weights: True FSDP-style sharded, False replicated
      shard_heads=False,         # trainable heads and their optimiser state: same choice
  ))
  # Compute dtype of backbones and heads: "float32" | "bfloat16" (parameters stay float32; losses,
  # metrics and optimiser arithmetic run in float32).
  c.dtype = "float32"

  # --- Logging and checkpoints.
  c.log_every_steps = 10
  c.checkpoint_every_steps = 200
  c.keep_checkpoints = 2

  # --- Resuming in a work directory that holds a run (ssvp_jax/resume.py): changes of keys that alter
  # the run's meaning are refused unless listed here, comma-separated ("optim.lr,optim.epochs", a
  # section such as "optim", or "all"). Never compared itself.
  c.resume = ml_collections.ConfigDict(dict(allow_changes=""))
  return c
