"""Shared SSVP configuration: every equation's constant and every SPEC.md decision (D1-D22).

Revised defaults (SPEC section 6, "rev." rows and D17-D22: where SSVP is silent, Bayes-PFL's code
wins); each earlier behaviour stays one field away, named beside the field.

Variants (`mvtec.py`, `visa.py`, `demo.py`, `tiny.py`) import `get_config()` from here and change a
few fields. Every field can be overridden on the command line, e.g.

  python -m ssvp_jax.train --config=configs/mvtec.py --workdir=runs/mvtec \
      --config.optim.epochs=5 --config.hsvs.fusion=concat
"""

import ml_collections

from ssvp_jax import reference


def dataset(name: str, root: str = "", categories: tuple[str, ...] = (), protocol: str = "full"
            ) -> ml_collections.ConfigDict:
  """One dataset entry: a reader name of ssvp_jax.data.datasets, its root, the split, a category subset,
  and the benchmark protocol ("full": the publisher's split; "bayes_pfl": the classes and images
  Bayes-PFL evaluates, see ssvp_jax/data/protocols.py; the paper configs use it).

  `synth` (demo only) names a layout for the demo-data generator, which then writes the data
  into `root` when that folder is absent.
  """
  return ml_collections.ConfigDict(dict(
      name=name, root=root, split="test", categories=categories, protocol=protocol,
      synth=dict(layout="", categories=(), size=128, num_good=12, num_anomalous=12, seed=0)))


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # --- Frozen backbones (SPEC section 1), by role; `name` picks the implementation from the registry
  # (ssvp_jax/models/registry.py: semantic "clip"; structural "dinov3" or "dinov2"). `bundle` is a folder
  # written by convert/<name>.py; an empty `bundle` with a `random_init` preset builds a randomly
  # initialised backbone (demo and tests only). Both image sizes must give one token grid (37 x 37 here;
  # DINOv2's patch 14 needs structural.image_size=518).
  c.backbones = ml_collections.ConfigDict(dict(
      semantic=dict(
          name="clip",
          bundle="",
          random_init="",            # "" (use bundle) or a preset of the backbone's module (PRESETS)
          image_size=518,
          layers=(6, 12, 18, 24),    # 1-based blocks tapped
          pos_interpolation="bilinear",
          local_tokens="raw",        # D3: "raw" residual stream + learned map | "value_value" (AnomalyCLIP)
      ),
      structural=dict(
          name="dinov3",
          bundle="",
          random_init="",
          image_size=592,
          layers=(6, 12, 18, 24),    # D2; the paper prints 3, 6, 9, 11
      ),
  ))

  # --- Trainable heads: each section is its module's constructor arguments (ssvp_jax/models/*.py).
  # D_c (768 at full size) is the semantic backbone's joint width, read from it.
  c.prompts = ml_collections.ConfigDict(dict(n_background=5, n_state=5, n_prompts=3))   # D4, Eq. 6
  c.class_words = "readable"     # D4: the prompts' words: "readable" category names | "object"
  c.hsvs = ml_collections.ConfigDict(dict(
      fusion="atf",              # "atf" | "concat"   (Table 3 ablation)
      num_heads=8, head_dim=64, share_scales=False,     # D1
      normalize_clip=True,       # D3: L2-normalise the mapped CLIP tokens (Bayes-PFL) | False (earlier)
  ))
  c.vcpg = ml_collections.ConfigDict(dict(
      enabled=True,              # Table 3 ablation: VCPG on/off
      latent_dim=128, latent_tokens=8,                  # D8: 8 tokens of 16 | 1 (earlier: Eq. 10 a no-op)
      beta=0.1, xi=0.85, use_ln=True,                   # Eq. 9, Eq. 12, D12
      kl_reduction="sum", rec_reduction="sum",          # D19: sums per image | "mean" (earlier rec)
      stop_grad_input=True,      # D18: the VAE reads stopgrad(V_syn^g) | False (gradient into HSVS)
  ))
  c.vtam = ml_collections.ConfigDict(dict(
      gating=True,               # Table 3 ablation: VTAM gates on/off
      tau=0.07, learn_tau=True,                         # D7: learned, lr optim.lr_tau | False (fixed)
      gamma=0.5,                 # Eq. 19
      top_k=10,                  # D9: S_local = mean of the top-k map values | 0 (the max, Eq. 18)
      s_global="softmax",        # D6: "softmax" | "cosine"
  ))

  # --- Losses (Eqs. 20-22).
  c.loss = ml_collections.ConfigDict(dict(
      lambda_vae=1.0, lambda_reg=0.5, focal_gamma=2.0,
      seg_form="balanced",       # D11: Bayes-PFL's class-balanced focal + batch Dice, summed over maps
                                 #      | "mean" (plain focal averaged over pixels and maps)
      dice=True,                 # D11: the Dice term ("mean" form: AnomalyCLIP's two per-image terms)
      supervise_fused=True,      # D17: L_seg also on the fused P_map | False (scales only)
      direct_logits=True,        # D20: scale logits (M_a - M_n)/tau upsampled | False (clipped probs)
  ))

  # --- Optimiser (SPEC section 5).
  c.optim = ml_collections.ConfigDict(dict(
      epochs=15, batch_size=8,
      lr_prompt=5e-4, lr=1e-4, b1=0.5, b2=0.999,
      lr_tau=0.01,               # D7: the learned temperature's own learning rate (Bayes-PFL)
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
  # D21: float32 matmuls at full precision (no TF32 on GPU), as PyTorch's default. "default" lets
  # XLA choose (TF32 on recent GPUs: faster, ~1e-3 relative error). CPUs ignore it.
  c.matmul_precision = "highest"

  # --- Logging and checkpoints. `print_decisions` logs the protocol, the class words and every
  # SPEC decision at the start of training and stores them in config.json (ssvp_jax/decisions.py).
  c.print_decisions = False
  c.log_every_steps = 10
  c.checkpoint_every_steps = 200
  c.keep_checkpoints = 2

  # --- Resuming in a work directory that holds a run (ssvp_jax/resume.py): changes of keys that alter
  # the run's meaning are refused unless listed here, comma-separated ("optim.lr,optim.epochs", a
  # section such as "optim", or "all"). Never compared itself.
  c.resume = ml_collections.ConfigDict(dict(allow_changes=""))
  return c
