"""The learnable prompt bank of SSVP (Eq. 6), fed through CLIP's frozen text tower.

Each prompt reads `[SOS] [V_bg x n_bg] [V_state x n_state] <class words> . [EOS]`. The background
tokens V_bg are shared by all prompts; each of the 2 * n_prompts prompts (n_prompts normal, then
n_prompts abnormal) has its own state tokens. Only these vectors train; the class words are
embedded by the frozen token table. The template ids depend on the dataset's class names and are
a call argument, so one trained prompt bank serves any target dataset (zero-shot).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# D4: the prompt words of every benchmark category, as Bayes-PFL names them (`models/VPB.py`
# class_mapping for MVTec-AD / VisA; the class folders its `dataset/datasets/*.py` scripts write
# for the others, lower-cased as its `prompt_names` does). Categories not listed here (MVTec-AD's
# and VisA's other ones, a user's folders) are read off their folder names by `class_words`.
CLASS_WORDS = {
    # MVTec-AD and VisA
    "metal_nut": "metal nut", "pcb1": "printed circuit board", "pcb2": "printed circuit board",
    "pcb3": "printed circuit board", "pcb4": "printed circuit board", "macaroni1": "macaroni",
    "macaroni2": "macaroni", "chewinggum": "chewing gum", "pipe_fryum": "pipe fryum",
    # BTAD
    "01": "metal1", "02": "wood", "03": "metal2",
    # KSDD2 (one class)
    "ksdd2": "metal",
    # RSDD: the pos/neg form Bayes-PFL reads; the release's two types are not in Bayes-PFL
    "rail": "metal15", "rail_type1": "rail", "rail_type2": "rail",
    # DAGM 2007 (Bayes-PFL evaluates 1-5, 7, 8; the other three named alike)
    **{f"Class{i}": f"fabric{i}" for i in range(1, 11)},
    # DTD-Synthetic
    "Woven_127": "woven1", "Woven_125": "woven2", "Woven_104": "woven3", "Woven_068": "woven4",
    "Woven_001": "woven5", "Stratified_154": "stratified", "Perforated_037": "perforated", "Mesh_114": "mesh",
    "Matted_069": "matted1", "Marbled_078": "marbled2", "Fibrous_183": "fibrous", "Blotchy_099": "blotchy",
}


def class_words(category: str, mode: str = "readable") -> str:
  """The words that stand for `category` in a prompt (D4): readable name, or "object".

  "readable": `CLASS_WORDS` for the benchmark categories; any other name has its underscores
  and dashes turned into spaces and is lower-cased ("metal_plate" -> "metal plate").
  """
  if mode == "object":
    return "object"
  if mode != "readable":
    raise ValueError(f"class_words mode must be 'readable' or 'object', got {mode!r}")
  if category in CLASS_WORDS:
    return CLASS_WORDS[category]
  words = re.sub(r"[_\-]+", " ", category).strip().lower()
  return words or "object"


@dataclasses.dataclass(frozen=True)
class Templates:
  """Token ids of one dataset's prompts: ids [C, L] with zeros at the learnable slots, eot [C]."""
  categories: tuple[str, ...]
  ids: np.ndarray
  eot: np.ndarray


def make_templates(tokenizer, categories: Sequence[str], n_learnable: int, mode: str = "readable",
                   context_length: int = 77) -> Templates:
  """Builds [SOS] [n_learnable slots] <words> . [EOS] for every category, trimmed to the longest.

  The text tower is causal, so tokens after EOS never reach the pooled EOS feature: trimming the
  padding changes nothing but the cost.
  """
  sos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
  rows = []
  for cat in categories:
    words = tokenizer(class_words(cat, mode) + ".", add_special_tokens=False)["input_ids"]
    row = [sos] + [0] * n_learnable + list(words) + [eos]
    if len(row) > context_length:
      raise ValueError(f"prompt for {cat!r} needs {len(row)} tokens, the text tower holds {context_length}")
    rows.append(row)
  length = max(len(r) for r in rows)
  ids = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    ids[i, :len(r)] = r
  eot = np.array([len(r) - 1 for r in rows], np.int32)
  return Templates(tuple(categories), ids, eot)


def templates_for(model, tokenizer, categories: Sequence[str], config) -> Templates:
  """`make_templates` for an SSVP `model`: its prompt length and its semantic backbone's text context,
  and the class words that `config.class_words` names (the one call of training, evaluation and predict)."""
  return make_templates(tokenizer, categories, model.prompts.n_learnable, config.class_words,
                        model.semantic.context_length)


class PromptLearner(nnx.Module):
  """Eq. 6: shared background tokens and per-prompt state tokens (normal bank first)."""

  def __init__(self, width: int, *, n_background: int = 5, n_state: int = 5, n_prompts: int = 3,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.n_background, self.n_state, self.n_prompts = n_background, n_state, n_prompts
    key_bg, key_state = rngs.params(), rngs.params()
    # Bayes-PFL's initialisation: context around 0, state tokens around +0.5 (normal) and
    # -0.5 (abnormal), all with std 0.02.
    self.background = nnx.Param(0.02 * jax.random.normal(key_bg, (n_background, width), param_dtype))
    centre = jnp.concatenate([jnp.full((n_prompts, 1, 1), 0.5), jnp.full((n_prompts, 1, 1), -0.5)])
    noise = 0.02 * jax.random.normal(key_state, (2 * n_prompts, n_state, width), param_dtype)
    self.state = nnx.Param((centre + noise).astype(param_dtype))  # [P, n_state, D]

  @property
  def n_learnable(self) -> int:
    return self.n_background + self.n_state

  def embeddings(self, word_embeds: jax.Array) -> jax.Array:
    """word_embeds [C, L, D] (template ids through the token table) -> prompts [C, P, L, D]."""
    c, length, d = word_embeds.shape
    p = self.state.shape[0]
    learnable = jnp.concatenate(
        [jnp.broadcast_to(self.background[...][None], (p, self.n_background, d)), self.state[...]], axis=1)
    learnable = jnp.broadcast_to(learnable[None].astype(word_embeds.dtype), (c, p, self.n_learnable, d))
    words = jnp.broadcast_to(word_embeds[:, None], (c, p, length, d))
    return jnp.concatenate([words[:, :, :1], learnable, words[:, :, 1 + self.n_learnable:]], axis=2)

  def __call__(self, clip, templates: Templates | tuple[jax.Array, jax.Array]) -> jax.Array:
    """T_init for every category: [C, P, E] (P = 2 * n_prompts, normal rows first).

    `clip` is the frozen CLIP module (its token table and text tower are used, never trained).
    """
    ids, eot = (templates.ids, templates.eot) if isinstance(templates, Templates) else templates
    ids, eot = jnp.asarray(ids), jnp.asarray(eot)
    prompts = self.embeddings(clip.token_embedding(ids))  # [C, P, L, D]
    c, p, length, d = prompts.shape
    out = clip.encode_text_embeds(prompts.reshape(c * p, length, d), jnp.repeat(eot, p))
    return out.reshape(c, p, -1)
