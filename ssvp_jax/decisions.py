"""The block a paper config prints at the start of training: protocol, class words, D1-D22.

Every choice SPEC section 6 leaves to us is a config field; this module reads them back from a
(possibly overridden) config, so that a run's log and its `config.json` say exactly which
decisions, which benchmark protocol and which prompt words produced its numbers.
Enabled by `config.print_decisions` (configs/mvtec.py and configs/visa.py set it).
"""

from __future__ import annotations

import logging
from typing import Any

import ml_collections

from ssvp_jax.data import protocols
from ssvp_jax.data.datasets import DATASETS
from ssvp_jax.models.prompts import class_words

log = logging.getLogger("ssvp_jax")


def _decisions(c: ml_collections.ConfigDict) -> dict[str, str]:
  h, v, t, loss, opt = c.hsvs, c.vcpg, c.vtam, c.loss, c.optim
  sem, struct = c.backbones.semantic, c.backbones.structural
  return {
      "D1": f"ATF {h.num_heads} heads x {h.head_dim}, {'shared' if h.share_scales else 'own weights per scale'}",
      "D2": f"{struct.name} taps {tuple(struct.layers)} ({sem.name} {tuple(sem.layers)})",
      "D3": f"{sem.name} local tokens {sem.get('local_tokens', 'raw')}, L2-normalised after the map: "
            f"{h.normalize_clip}",
      "D4": f"{c.prompts.n_background} background + {c.prompts.n_state} state tokens, class words {c.class_words}",
      "D5": "bank prototype: mean of normalised rows",
      "D6": f"S_global {t.s_global}",
      "D7": (f"tau learned from {t.tau}, lr {opt.get('lr_tau', opt.lr)}" if t.learn_tau else f"tau fixed {t.tau}"),
      "D8": f"latent {v.latent_dim}-d in {v.latent_tokens} token(s)",
      "D9": f"S_local mean of the top {t.top_k}" if t.top_k else "S_local max",
      "D10": "deep text prompts off",
      "D11": f"L_seg form {loss.get('seg_form', 'mean')}, Dice {loss.dice}",
      "D12": f"LayerNorm in Eq. 11: {v.use_ln}",
      "D13": "no training augmentation",
      "D14": f"map smoothing sigma {c.eval.sigma}",
      "D15": f"score normalisation {c.eval.score_norm}",
      "D16": f"warmup {opt.warmup_frac:.0%} of steps, then cosine",
      "D17": f"L_seg on the fused P_map too: {loss.get('supervise_fused', False)}",
      "D18": f"stop-gradient into the VAE: {v.stop_grad_input}",
      "D19": f"Eq. 9 reconstruction {v.rec_reduction}, KL {v.kl_reduction} per image",
      "D20": f"training logits direct: {loss.get('direct_logits', False)}",
      "D21": f"compute {c.get('dtype') or 'float32'}, VTAM and losses float32, matmul precision "
             f"{c.get('matmul_precision') or 'highest'}, log_var clamped",
      "D22": "EXIF orientation only for predict/calibrate photos, never benchmark images",
  }


def _dataset(ds: ml_collections.ConfigDict, mode: str) -> dict[str, Any]:
  protocol = ds.get("protocol", "full")
  cats = tuple(ds.categories) or protocols.default_categories(ds.name, protocol)
  if cats is None:
    cats = DATASETS[ds.name].categories if ds.name in DATASETS else ()
  return {"name": ds.name, "protocol": protocol,
          "class_words": {c: class_words(c, mode) for c in cats} or "from the category folders"}


def summary(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{"train_data": {...}, "eval_data": {key: {...}}, "decisions": {"D1": ..., ...}} of a config."""
  mode = config.class_words
  return {"train_data": _dataset(config.train_data, mode),
          "eval_data": {k: _dataset(v, mode) for k, v in config.eval_data.items()},
          "decisions": _decisions(config)}


def format_block(s: dict[str, Any]) -> str:
  """The summary as one readable block of lines."""
  lines = ["protocol, class words and decisions (SPEC section 6):"]
  for role, ds in [("train", s["train_data"])] + [(f"eval {k}", v) for k, v in s["eval_data"].items()]:
    words = ds["class_words"]
    shown = ", ".join(f"{c}={w!r}" for c, w in words.items()) if isinstance(words, dict) else words
    lines.append(f"  {role}: {ds['name']} ({ds['protocol']} protocol): {shown}")
  lines += [f"  {k}: {v}" for k, v in s["decisions"].items()]
  return "\n".join(lines)


def announce(config: ml_collections.ConfigDict) -> None:
  """Logs the block and stores it as `config.decisions`, so that config.json carries it too."""
  s = summary(config)
  log.info("%s", format_block(s))
  with config.unlocked():
    config.decisions = s
