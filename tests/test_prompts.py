"""The prompt learner (Eq. 6) through a tiny frozen CLIP text tower."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssvp_jax.models import clip as clip_lib
from ssvp_jax.models.prompts import PromptLearner, class_words, make_templates


@pytest.fixture(scope="module")
def tiny():
  cfg = clip_lib.CLIPConfig(
      vision=clip_lib.VisionConfig(image_size=14, patch_size=7, width=12, layers=1, heads=2, mlp_dim=20),
      text=clip_lib.TextConfig(vocab_size=clip_lib.BYTE_VOCAB_SIZE, context_length=40, width=20, layers=2,
                               heads=2, mlp_dim=28),
      projection_dim=10)
  return clip_lib.CLIP(cfg, rngs=nnx.Rngs(0)), clip_lib.byte_level_tokenizer()


# D4: the prompt words of every category of every benchmark reader, as Bayes-PFL names them.
EXPECTED_WORDS = {
    "mvtec": {"bottle": "bottle", "cable": "cable", "capsule": "capsule", "carpet": "carpet", "grid": "grid",
              "hazelnut": "hazelnut", "leather": "leather", "metal_nut": "metal nut", "pill": "pill",
              "screw": "screw", "tile": "tile", "toothbrush": "toothbrush", "transistor": "transistor",
              "wood": "wood", "zipper": "zipper"},
    "visa": {"candle": "candle", "capsules": "capsules", "cashew": "cashew", "chewinggum": "chewing gum",
             "fryum": "fryum", "macaroni1": "macaroni", "macaroni2": "macaroni", "pcb1": "printed circuit board",
             "pcb2": "printed circuit board", "pcb3": "printed circuit board", "pcb4": "printed circuit board",
             "pipe_fryum": "pipe fryum"},
    "mpdd": {"bracket_black": "bracket black", "bracket_brown": "bracket brown", "bracket_white": "bracket white",
             "connector": "connector", "metal_plate": "metal plate", "tubes": "tubes"},
    "btad": {"01": "metal1", "02": "wood", "03": "metal2"},
    "ksdd2": {"ksdd2": "metal"},
    "rsdd": {"rail_type1": "rail", "rail_type2": "rail", "rail": "metal15"},
    "dagm": {f"Class{i}": f"fabric{i}" for i in range(1, 11)},
    "dtd": {"Blotchy_099": "blotchy", "Fibrous_183": "fibrous", "Marbled_078": "marbled2", "Matted_069": "matted1",
            "Mesh_114": "mesh", "Perforated_037": "perforated", "Stratified_154": "stratified",
            "Woven_001": "woven5", "Woven_068": "woven4", "Woven_104": "woven3", "Woven_125": "woven2",
            "Woven_127": "woven1"},
}


def test_class_words_of_every_benchmark_category():
  from ssvp_jax.data.datasets import DATASETS
  for name, info in DATASETS.items():
    if not info.categories:  # folder, meta: any names
      continue
    assert set(info.categories) == set(EXPECTED_WORDS[name]), name
    got = {c: class_words(c) for c in info.categories}
    assert got == EXPECTED_WORDS[name], name
    assert all(class_words(c, mode="object") == "object" for c in info.categories)
  # No benchmark category falls back to a meaningless word (the earlier "class", "ksdd", "object").
  assert not {w for d in EXPECTED_WORDS.values() for w in d.values()} & {"class", "ksdd", "object"}


def test_class_words_of_other_names():
  assert class_words("my-part_A") == "my part a"
  assert class_words("part2") == "part2"
  assert class_words("screw", mode="object") == "object"
  with pytest.raises(ValueError, match="readable"):
    class_words("screw", mode="nope")


def test_templates_layout(tiny):
  _, tok = tiny
  t = make_templates(tok, ["nut", "metal_nut"], n_learnable=4)
  assert t.ids.shape == (2, len(t.ids[1]))
  assert (t.ids[:, 0] == tok.bos_token_id).all() and (t.ids[:, 1:5] == 0).all()
  assert t.ids[0, t.eot[0]] == tok.eos_token_id and t.ids[1, t.eot[1]] == tok.eos_token_id
  assert t.eot[1] > t.eot[0] and (t.ids[0, t.eot[0] + 1:] == 0).all()
  words = tok("metal nut.", add_special_tokens=False)["input_ids"]
  assert list(t.ids[1, 5:t.eot[1]]) == words


def test_t_init_equals_direct_splice_and_ignores_padding(tiny):
  model, tok = tiny
  learner = PromptLearner(20, n_background=2, n_state=3, n_prompts=3, rngs=nnx.Rngs(1))
  t = make_templates(tok, ["bottle", "wood"], learner.n_learnable)
  t_init = learner(model, t)  # [C, P, E]
  assert t_init.shape == (2, 6, 10)
  # By hand for class 1, prompt 4 (an abnormal one), padded to the full context: the causal tower
  # makes the trimmed and the padded template give the same EOT feature.
  ids = np.zeros((1, 40), np.int32)
  ids[0, :t.ids.shape[1]] = t.ids[1]
  emb = model.token_embedding(jnp.asarray(ids))
  learned = jnp.concatenate([learner.background[...], learner.state[...][4]], axis=0)
  emb = emb.at[0, 1:1 + learner.n_learnable].set(learned)
  direct = model.encode_text_embeds(emb, jnp.asarray(t.eot[1:2]))
  np.testing.assert_allclose(np.asarray(t_init[1, 4]), np.asarray(direct[0]), atol=1e-5)


def test_state_init_and_gradients_reach_prompts(tiny):
  model, tok = tiny
  learner = PromptLearner(20, n_background=2, n_state=3, n_prompts=3, rngs=nnx.Rngs(1))
  state = np.asarray(learner.state[...])
  assert abs(state[:3].mean() - 0.5) < 0.02 and abs(state[3:].mean() + 0.5) < 0.02
  t = make_templates(tok, ["tile"], learner.n_learnable)

  def loss(learner, model):
    return jnp.sum(learner(model, t) ** 2)

  grads = nnx.grad(loss)(learner, model)  # w.r.t. the learner only
  assert float(jnp.abs(grads.background[...]).sum()) > 0 and float(jnp.abs(grads.state[...]).sum()) > 0
