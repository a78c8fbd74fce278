"""The whole SSVP model: frozen semantic + structural backbones -> HSVS -> VCPG -> VTAM.

    features(semantic_images, structural_images)   frozen backbones, SPEC section 1 (cacheable)
    prompt_table(templates)                        T_init for every class of a dataset (Eq. 6)
    heads(features, t_init, rngs=...)              Eqs. 2-19 -> maps, scores, VAE/regulariser terms

The backbones (any pair of the registry, ssvp_jax/models/registry.py: CLIP + DINOv3 as in the paper)
live inside the module, under the one attribute `backbones`, so that one object runs inference end
to end; they are never trained: `TRAINABLE` excludes them from the optimiser, from gradients and from
checkpoints. The heads are built from the config sections `prompts`, `hsvs`, `vcpg` and `vtam`, whose
keys are their constructors' arguments.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ssvp_jax.models.backbone import Backbone, TextSide
from ssvp_jax.models.hsvs import HSVS
from ssvp_jax.models.prompts import PromptLearner, Templates
from ssvp_jax.models.vcpg import VCPG
from ssvp_jax.models.vtam import VTAM

FROZEN = nnx.PathContains("backbones")
TRAINABLE = nnx.All(nnx.Param, nnx.Not(FROZEN))


class Features(NamedTuple):
  """Frozen backbone features of a batch (what the feature cache stores)."""
  semantic_local: tuple[jax.Array, ...]    # L x [B, N, C_in]  CLIP: raw residual stream (D3) or projected (v-v)
  semantic_global: jax.Array               # [B, E]            CLIP: ln_post(CLS) @ proj
  structural_local: tuple[jax.Array, ...]  # L x [B, N, D_d]   DINO: final norm, CLS and registers dropped
  structural_global: jax.Array             # [B, D_d]          DINO: CLS after the final norm


class Backbones(nnx.Module):
  """The two frozen backbones, one attribute each (parameter paths `backbones.semantic...`)."""

  def __init__(self, semantic: Backbone, structural: Backbone):
    self.semantic, self.structural = semantic, structural


class Outputs(NamedTuple):
  scale_probs: tuple[jax.Array, ...]  # L x [B, h, w]  P^l (Eq. 14)
  scale_logits: tuple[jax.Array, ...]  # L x [B, h, w]  (M_a - M_n) / tau (D20)
  p_map: jax.Array                    # [B, h, w]      Eq. 17
  s_global: jax.Array                 # [B]
  s_local: jax.Array                  # [B]
  s_final: jax.Array                  # [B]            Eq. 19
  l_vae: jax.Array                    # []             Eq. 9
  l_reg: jax.Array                    # []             Eq. 12


def _grid(n: int) -> tuple[int, int]:
  side = int(round(n ** 0.5))
  if side * side != n:
    raise ValueError(f"{n} patch tokens do not form a square grid")
  return side, side


class SSVP(nnx.Module):
  """SSVP on top of a frozen semantic and a frozen structural backbone; `config` a full config (its
  backbones' `layers` and the head sections)."""

  def __init__(self, semantic: Backbone, structural: Backbone, config, *, dtype=None, rngs: nnx.Rngs):
    """dtype: compute dtype of the heads (None: float32 as their inputs); parameters stay float32."""
    self.backbones = Backbones(semantic, structural)
    self.semantic_layers = tuple(config.backbones.semantic.layers)
    self.structural_layers = tuple(config.backbones.structural.layers)
    if len(self.semantic_layers) != len(self.structural_layers):
      raise ValueError(f"config.backbones.semantic.layers {self.semantic_layers} and config.backbones.structural."
                       f"layers {self.structural_layers} must tap the same number of scales")
    text: TextSide = semantic
    dim = semantic.global_dim  # D_c: V_syn lives in the semantic joint space (768 at full size)
    self.prompts = PromptLearner(text.text_width, **config.prompts, rngs=rngs)
    self.hsvs = HSVS(len(self.semantic_layers), clip_dim=dim, dino_dim=structural.local_dim,
                     clip_in_dim=None if text.local_in_joint_space else semantic.local_dim,
                     **config.hsvs, dtype=dtype, rngs=rngs)
    self.vcpg = VCPG(dim, **config.vcpg, dtype=dtype, rngs=rngs)
    # D21: VTAM computes in float32 (dtype None on float32 inputs, see `heads`).
    self.vtam = VTAM(dim, len(self.semantic_layers), num_normal=config.prompts.n_prompts, **config.vtam,
                     rngs=rngs)

  @property
  def semantic(self):
    return self.backbones.semantic

  @property
  def structural(self):
    return self.backbones.structural

  # ---------------------------------------------------------------- frozen part (SPEC section 1)

  def features(self, semantic_images: jax.Array, structural_images: jax.Array) -> Features:
    """[B, H, W, 3] images for each backbone, each normalised with its MEAN/STD."""
    s = self.semantic.encode(semantic_images, self.semantic_layers)
    d = self.structural.encode(structural_images, self.structural_layers)
    n_s, n_d = s.local[0].shape[1], d.local[0].shape[1]
    if n_s != n_d:
      raise ValueError(f"the semantic backbone gives {n_s} patch tokens but the structural one gives {n_d}: "
                       "choose image sizes with the same grid (e.g. 518 px / patch 14 and 592 px / patch 16 "
                       "both give 37x37)")
    feats = Features(semantic_local=s.local, semantic_global=s.global_, structural_local=d.local,
                     structural_global=d.global_)
    return jax.tree.map(jax.lax.stop_gradient, feats)

  # ---------------------------------------------------------------- trainable part

  def prompt_table(self, templates: Templates | tuple[jax.Array, jax.Array]) -> jax.Array:
    """T_init of every class of a dataset, [C, P, E] (Eq. 6 through the frozen text tower)."""
    return self.prompts(self.semantic, templates)

  def heads(self, feats: Features, t_init: jax.Array, *, rngs: nnx.Rngs | None = None,
            deterministic: bool = True) -> Outputs:
    """feats of B images; t_init [B, P, E] (each image's class rows of `prompt_table`).

    Training (deterministic=False) draws the VAE noise from `rngs.sample` (Eq. 8).
    """
    v_local, v_global = self.hsvs(feats.semantic_local, feats.structural_local, feats.semantic_global,
                                  feats.structural_global)
    vc = self.vcpg(v_global, t_init, rngs=rngs, deterministic=deterministic)
    f32 = lambda x: x.astype(jnp.float32)  # D21: VTAM in float32 under a bfloat16 compute dtype
    out = self.vtam([f32(v) for v in v_local], f32(v_global), f32(vc.t_final))
    b, n = out.p_map.shape
    h, w = _grid(n)
    return Outputs(scale_probs=tuple(p.reshape(b, h, w) for p in out.scale_probs),
                   scale_logits=tuple(x.reshape(b, h, w) for x in out.scale_logits),
                   p_map=out.p_map.reshape(b, h, w), s_global=out.s_global, s_local=out.s_local,
                   s_final=out.s_final, l_vae=vc.l_vae, l_reg=vc.l_reg)

  def __call__(self, semantic_images: jax.Array, structural_images: jax.Array, class_index: jax.Array,
               templates: Templates | tuple[jax.Array, jax.Array]) -> Outputs:
    """Deterministic inference end to end: images -> anomaly maps (token grid) and scores."""
    t_init = self.prompt_table(templates)[class_index]
    return self.heads(self.features(semantic_images, structural_images), t_init, deterministic=True)
