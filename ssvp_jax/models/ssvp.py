"""The whole SSVP model: frozen CLIP + DINOv3 features -> HSVS -> VCPG -> VTAM.

    features(clip_images, dino_images)        frozen backbones, SPEC section 1 (cacheable)
    prompt_table(templates)                   T_init for every class of a dataset (Eq. 6)
    heads(features, t_init, rngs=...)         Eqs. 2-19 -> maps, scores, VAE/regulariser terms

The backbones live inside the module (attributes `clip` and `dino`) so that one object runs
inference end to end, but they are never trained: `TRAINABLE` excludes them from the optimiser,
from gradients and from checkpoints.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ssvp_jax.models import clip as clip_lib
from ssvp_jax.models import dinov3 as dinov3_lib
from ssvp_jax.models.hsvs import HSVS
from ssvp_jax.models.prompts import PromptLearner, Templates
from ssvp_jax.models.vcpg import VCPG
from ssvp_jax.models.vtam import VTAM

FROZEN = nnx.Any(nnx.PathContains("clip"), nnx.PathContains("dino"))
TRAINABLE = nnx.All(nnx.Param, nnx.Not(FROZEN))


class Features(NamedTuple):
  """Frozen backbone features of a batch (what the feature cache stores)."""
  clip_local: tuple[jax.Array, ...]   # L x [B, N, C_in]  raw residual stream (D3) or projected (vv)
  clip_global: jax.Array              # [B, E]            ln_post(CLS) @ proj
  dino_local: tuple[jax.Array, ...]   # L x [B, N, D_d]   final norm, CLS and registers dropped
  dino_global: jax.Array              # [B, D_d]          CLS after the final norm


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
  """SSVP on top of the frozen backbones `clip` and `dino`; `cfg` is the config's `model` section."""

  def __init__(self, cfg: ml_collections.ConfigDict, clip: clip_lib.CLIP, dino: dinov3_lib.DINOv3,
               clip_layers: Sequence[int], dino_layers: Sequence[int], local_tokens: str = "raw", *,
               dtype=None, rngs: nnx.Rngs):
    """dtype: compute dtype of the heads (None: float32 as their inputs); parameters stay float32."""
    if len(clip_layers) != len(dino_layers):
      raise ValueError(f"clip.layers {tuple(clip_layers)} and dino.layers {tuple(dino_layers)} must "
                       "tap the same number of scales")
    if local_tokens not in ("raw", "value_value"):
      raise ValueError(f"clip.local_tokens must be 'raw' or 'value_value', got {local_tokens!r}")
    self.clip, self.dino = clip, dino
    self.clip_layers, self.dino_layers = tuple(clip_layers), tuple(dino_layers)
    self.local_tokens = local_tokens
    dim = clip.config.projection_dim  # D_c: V_syn lives in CLIP's joint space (768 at full size)
    dino_dim = dino.cfg.hidden_size
    self.prompts = PromptLearner(clip.config.text.width, n_background=cfg.n_background, n_state=cfg.n_state,
                                 n_prompts=cfg.n_prompts, rngs=rngs)
    self.hsvs = HSVS(len(self.clip_layers), clip_dim=dim, dino_dim=dino_dim,
                     clip_in_dim=clip.config.vision.width if local_tokens == "raw" else None,
                     num_heads=cfg.atf_heads, head_dim=cfg.atf_head_dim, fusion=cfg.fusion,
                     share_scales=cfg.atf_shared, normalize_clip=cfg.get("clip_token_norm", False),
                     dtype=dtype, rngs=rngs)
    self.vcpg = VCPG(dim, latent_dim=cfg.latent_dim, latent_tokens=cfg.latent_tokens, beta=cfg.beta,
                     kl_reduction=cfg.kl_reduction, rec_reduction=cfg.get("rec_reduction", "mean"),
                     stop_grad_input=cfg.get("vae_stop_grad", False), xi=cfg.xi,
                     use_ln=cfg.prompt_ln, enabled=cfg.vcpg, dtype=dtype, rngs=rngs)
    # D21: VTAM computes in float32 (dtype None on float32 inputs, see `heads`).
    self.vtam = VTAM(dim, len(self.clip_layers), num_normal=cfg.n_prompts, tau=cfg.tau, learn_tau=cfg.learn_tau,
                     gating=cfg.gating, s_global={"prob": "softmax", "cosine": "cosine"}[cfg.s_global],
                     top_k=cfg.s_local_topk if cfg.s_local == "topk" else None, gamma=cfg.gamma, rngs=rngs)

  # ---------------------------------------------------------------- frozen part (SPEC section 1)

  def features(self, clip_images: jax.Array, dino_images: jax.Array) -> Features:
    """clip_images [B, Hc, Wc, 3], dino_images [B, Hd, Wd, 3], each normalised for its backbone."""
    vv = ()
    if self.local_tokens == "value_value":  # AnomalyCLIP: the v-v path from the first tap on
      vv = tuple(range(min(self.clip_layers), max(self.clip_layers) + 1))
    c = self.clip.encode_image(clip_images, layers=self.clip_layers, value_value_layers=vv,
                               project_tokens=self.local_tokens == "value_value")
    taps = c.projected if self.local_tokens == "value_value" else c.hidden_states
    d = self.dino.encode_image(dino_images, layers=self.dino_layers)
    feats = Features(
        clip_local=tuple(t[:, 1:] for t in taps),
        clip_global=c.image_embeds,
        dino_local=tuple(self.dino.patch_tokens(h) for h in d.hidden_states),
        dino_global=d.last_hidden_state[:, 0])
    n_c, n_d = feats.clip_local[0].shape[1], feats.dino_local[0].shape[1]
    if n_c != n_d:
      raise ValueError(f"CLIP gives {n_c} patch tokens but DINOv3 gives {n_d}: choose image sizes with the "
                       "same grid (e.g. 518 px / patch 14 and 592 px / patch 16 both give 37x37)")
    return jax.tree.map(jax.lax.stop_gradient, feats)

  # ---------------------------------------------------------------- trainable part

  def prompt_table(self, templates: Templates | tuple[jax.Array, jax.Array]) -> jax.Array:
    """T_init of every class of a dataset, [C, P, E] (Eq. 6 through the frozen text tower)."""
    return self.prompts(self.clip, templates)

  def heads(self, feats: Features, t_init: jax.Array, *, rngs: nnx.Rngs | None = None,
            deterministic: bool = True) -> Outputs:
    """feats of B images; t_init [B, P, E] (each image's class rows of `prompt_table`).

    Training (deterministic=False) draws the VAE noise from `rngs.sample` (Eq. 8).
    """
    v_local, v_global = self.hsvs(feats.clip_local, feats.dino_local, feats.clip_global, feats.dino_global)
    vc = self.vcpg(v_global, t_init, rngs=rngs, deterministic=deterministic)
    f32 = lambda x: x.astype(jnp.float32)  # D21: VTAM in float32 under a bfloat16 compute dtype
    out = self.vtam([f32(v) for v in v_local], f32(v_global), f32(vc.t_final))
    b, n = out.p_map.shape
    h, w = _grid(n)
    return Outputs(scale_probs=tuple(p.reshape(b, h, w) for p in out.scale_probs),
                   scale_logits=tuple(x.reshape(b, h, w) for x in out.scale_logits),
                   p_map=out.p_map.reshape(b, h, w), s_global=out.s_global, s_local=out.s_local,
                   s_final=out.s_final, l_vae=vc.l_vae, l_reg=vc.l_reg)

  def __call__(self, clip_images: jax.Array, dino_images: jax.Array, class_index: jax.Array,
               templates: Templates | tuple[jax.Array, jax.Array]) -> Outputs:
    """Deterministic inference end to end: images -> anomaly maps (token grid) and scores."""
    t_init = self.prompt_table(templates)[class_index]
    return self.heads(self.features(clip_images, dino_images), t_init, deterministic=True)
