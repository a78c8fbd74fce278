"""HSVS: Hierarchical Semantic-Visual Synergy (SPEC section 2, Eqs. 2-5).

CLIP tokens carry semantics aligned with text; DINOv3 tokens carry structure.
One ATF block per tapped scale (and one for the global pair) lets each side
attend to the other and adds the fused result back onto the CLIP side, so that
V_syn stays in CLIP's D_c-d space where VTAM compares it with the prompts.

Shapes: B batch, N = h * w patch tokens (the same grid for both backbones),
D_c CLIP width (768), D_d DINOv3 width (1024), H heads of d_head dims.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ssvp_jax.models.layers import LN_EPS, MLP, l2_normalize

FUSIONS = ("atf", "concat")


def cross_attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int) -> jax.Array:
  """Eq. 3: A = softmax(Q K^T / sqrt(d_head)) V, per head, heads concatenated.

  q [B, Nq, H*d_head], k and v [B, Nk, H*d_head] -> [B, Nq, H*d_head].
  With Nk = 1 the softmax is over one key, so every query gets exactly V (the
  global pair in SPEC section 2 is this same code with N = 1).
  """
  def heads(x):  # [B, N, H*dh] -> [B, N, H, dh]
    return x.reshape(*x.shape[:2], num_heads, x.shape[-1] // num_heads)

  out = jax.nn.dot_product_attention(heads(q), heads(k), heads(v))  # scale 1/sqrt(dh) by default
  return out.reshape(*q.shape[:2], -1)


def _check_pair(f_c: jax.Array, f_d: jax.Array, clip_dim: int, dino_dim: int, who: str) -> None:
  if f_c.ndim != 3 or f_d.ndim != 3:
    raise ValueError(f"hsvs.{who}: expected F_c [B, N, {clip_dim}] and F_d [B, N, {dino_dim}], "
                     f"got {f_c.shape} and {f_d.shape}")
  if f_c.shape[-1] != clip_dim or f_d.shape[-1] != dino_dim:
    raise ValueError(f"hsvs.{who}: feature widths {f_c.shape[-1]} (CLIP) and {f_d.shape[-1]} (DINOv3) "
                     f"do not match the module's {clip_dim} and {dino_dim}")
  if f_c.shape[:2] != f_d.shape[:2]:
    raise ValueError(f"hsvs.{who}: CLIP tokens {f_c.shape[:2]} and DINOv3 tokens {f_d.shape[:2]} differ in "
                     "batch or token count; both backbones must give the same grid")


class ATF(nnx.Module):
  """Adaptive Token Features fusion: dual-path cross-attention (Eqs. 2-5).

  Projections carry no bias, as written in Eq. 2. There is no output
  projection: Eq. 4 normalises the concatenated heads directly.
  """

  def __init__(self, clip_dim: int, dino_dim: int, *, num_heads: int = 8, head_dim: int = 64,
               mlp_dim: int | None = None, ln_eps: float = LN_EPS, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    """mlp_dim: hidden width of the Eq. 5 MLP; None means clip_dim (the paper gives none)."""
    self.clip_dim, self.dino_dim, self.num_heads = clip_dim, dino_dim, num_heads
    inner = num_heads * head_dim

    def proj(d_in):
      return nnx.Linear(d_in, inner, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    # Eq. 2: CLIP queries DINOv3 (c->d) and DINOv3 queries CLIP (d->c).
    self.q_c, self.k_d, self.v_d = proj(clip_dim), proj(dino_dim), proj(dino_dim)
    self.q_d, self.k_c, self.v_c = proj(dino_dim), proj(clip_dim), proj(clip_dim)
    norm = dict(epsilon=ln_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm_cd = nnx.LayerNorm(inner, **norm)
    self.norm_dc = nnx.LayerNorm(inner, **norm)
    self.mlp = MLP(2 * inner, mlp_dim or clip_dim, clip_dim, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)

  def attend(self, f_c: jax.Array, f_d: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eq. 2 (projections) then Eq. 3 both ways: (A_cd, A_dc), each [B, N, H*d_head]."""
    _check_pair(f_c, f_d, self.clip_dim, self.dino_dim, "ATF")
    a_cd = cross_attention(self.q_c(f_c), self.k_d(f_d), self.v_d(f_d), self.num_heads)
    a_dc = cross_attention(self.q_d(f_d), self.k_c(f_c), self.v_c(f_c), self.num_heads)
    return a_cd, a_dc

  def __call__(self, f_c: jax.Array, f_d: jax.Array) -> jax.Array:
    """f_c [B, N, D_c], f_d [B, N, D_d] -> V_syn [B, N, D_c].

    Eq. 4: Z = concat(LN(A_cd), LN(A_dc)); Eq. 5: V_syn = F_c + MLP(Z).
    """
    a_cd, a_dc = self.attend(f_c, f_d)
    z = jnp.concatenate([self.norm_cd(a_cd), self.norm_dc(a_dc)], axis=-1)  # [B, N, 2*H*dh]
    return f_c + self.mlp(z)


class ConcatFusion(nnx.Module):
  """Ablation "HSVS as plain concatenation" (SPEC section 7), no attention:

      V_syn = F_c + MLP(concat(LN(F_c), LN(F_d)))

  Same residual form and MLP as Eq. 5, so the ablation isolates the
  cross-attention of Eqs. 2-4.
  """

  def __init__(self, clip_dim: int, dino_dim: int, *, mlp_dim: int | None = None, ln_eps: float = LN_EPS,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.clip_dim, self.dino_dim = clip_dim, dino_dim
    norm = dict(epsilon=ln_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm_c = nnx.LayerNorm(clip_dim, **norm)
    self.norm_d = nnx.LayerNorm(dino_dim, **norm)
    self.mlp = MLP(clip_dim + dino_dim, mlp_dim or clip_dim, clip_dim, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)

  def __call__(self, f_c: jax.Array, f_d: jax.Array) -> jax.Array:
    """f_c [B, N, D_c], f_d [B, N, D_d] -> V_syn [B, N, D_c]."""
    _check_pair(f_c, f_d, self.clip_dim, self.dino_dim, "ConcatFusion")
    return f_c + self.mlp(jnp.concatenate([self.norm_c(f_c), self.norm_d(f_d)], axis=-1))


class HSVS(nnx.Module):
  """One fusion block per tapped scale plus one for the global pair (D1, D3).

  Args:
    num_scales: number of tapped layers L (4: blocks 6/12/18/24).
    clip_dim: D_c, the width of V_syn and of CLIP's global feature (768).
    dino_dim: D_d, DINOv3's width (1024), local and global.
    clip_in_dim: width of the raw CLIP local tokens (1024). D3 default: a
      learned bias-free linear map per tapped layer clip_in_dim -> clip_dim
      (Bayes-PFL's `linear_proj`). None: the tokens already are clip_dim wide
      (D3's value-value alternative) and no map is created.
    num_heads, head_dim: ATF attention sizes (D1: 8 x 64).
    mlp_dim: hidden width of the fusion MLP (None: clip_dim).
    fusion: "atf" (Eqs. 2-5) or "concat" (the plain-concatenation ablation).
    share_scales: D1 alternative; one fusion block serves every local scale.
      The global pair keeps its own block either way, and the per-layer CLIP
      maps stay per layer (they are D3, not D1).
    normalize_clip: D3 (default True): each mapped CLIP token is L2-normalised after its
      per-layer map, as Bayes-PFL (`linear_proj` then `F_s / F_s.norm()`), so that the
      residual of Eq. 5 and the gates do not scale with the residual stream's norm, which
      grows with depth. False: the mapped tokens as they are (the earlier default). Only
      applies where the map exists (clip_in_dim set).

  The global pair runs the same ATF code with N = 1, where each softmax is
  over one key: the global block's four Q/K projections (q_c, k_d, q_d, k_c)
  never affect the output and never get a gradient. They are kept so that
  the code is one and the same (an optimizer mask may skip them).
  """

  def __init__(self, num_scales: int = 4, *, clip_dim: int = 768, dino_dim: int = 1024,
               clip_in_dim: int | None = 1024, num_heads: int = 8, head_dim: int = 64,
               mlp_dim: int | None = None, fusion: str = "atf", share_scales: bool = False,
               normalize_clip: bool = True, ln_eps: float = LN_EPS, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    if fusion not in FUSIONS:
      raise ValueError(f"hsvs.HSVS: fusion must be one of {FUSIONS}, got {fusion!r}")
    if num_scales < 1:
      raise ValueError(f"hsvs.HSVS: num_scales must be >= 1, got {num_scales}")
    self.num_scales, self.clip_dim, self.dino_dim = num_scales, clip_dim, dino_dim
    self.clip_in_dim, self.fusion, self.share_scales = clip_in_dim, fusion, share_scales
    self.normalize_clip = normalize_clip

    def block():
      if fusion == "atf":
        return ATF(clip_dim, dino_dim, num_heads=num_heads, head_dim=head_dim, mlp_dim=mlp_dim, ln_eps=ln_eps,
                   dtype=dtype, param_dtype=param_dtype, rngs=rngs)
      return ConcatFusion(clip_dim, dino_dim, mlp_dim=mlp_dim, ln_eps=ln_eps, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)

    if clip_in_dim is None:
      self.clip_maps = None
    else:
      self.clip_maps = nnx.List([
          nnx.Linear(clip_in_dim, clip_dim, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
          for _ in range(num_scales)])
    self.local_blocks = nnx.List([block() for _ in range(1 if share_scales else num_scales)])
    self.global_block = block()

  def __call__(self, clip_local: Sequence[jax.Array], dino_local: Sequence[jax.Array],
               clip_global: jax.Array, dino_global: jax.Array) -> tuple[list[jax.Array], jax.Array]:
    """Fuses every scale and the global pair.

    Args:
      clip_local: L arrays [B, N, clip_in_dim] (or [B, N, D_c] when clip_in_dim is None).
      dino_local: L arrays [B, N, D_d].
      clip_global: F_c^g [B, D_c]; dino_global: F_d^g [B, D_d].
    Returns:
      ([V_syn^l [B, N, D_c] for each scale], V_syn^g [B, D_c]).
    """
    if len(clip_local) != self.num_scales or len(dino_local) != self.num_scales:
      raise ValueError(f"hsvs.HSVS: built for {self.num_scales} scales, got {len(clip_local)} CLIP and "
                       f"{len(dino_local)} DINOv3 token sets")
    want_in = self.clip_in_dim or self.clip_dim
    local = []
    for l, (f_c, f_d) in enumerate(zip(clip_local, dino_local)):
      if f_c.shape[-1] != want_in:
        raise ValueError(f"hsvs.HSVS: CLIP tokens of scale {l} are {f_c.shape[-1]}-d, expected {want_in} "
                         f"(clip_in_dim={self.clip_in_dim})")
      if self.clip_maps is not None:
        f_c = self.clip_maps[l](f_c)  # D3: [B, N, clip_in_dim] -> [B, N, D_c]
        if self.normalize_clip:
          f_c = l2_normalize(f_c)
      local.append(self.local_blocks[0 if self.share_scales else l](f_c, f_d))
    if clip_global.ndim != 2 or dino_global.ndim != 2:
      raise ValueError(f"hsvs.HSVS: global features must be [B, D], got {clip_global.shape} and {dino_global.shape}")
    # The global pair is one token per side: the same block code with N = 1.
    v_global = self.global_block(clip_global[:, None, :], dino_global[:, None, :])[:, 0, :]  # [B, D_c]
    return local, v_global
