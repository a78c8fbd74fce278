"""DINOv2 ViT image encoder in Flax NNX (frozen backbone, inference only).

Matches transformers' `Dinov2Model` and `Dinov2WithRegistersModel` in eval mode:
a conv patch embedding, a CLS token, a learned position table added to
[CLS, patches], register tokens (if any) inserted after the CLS token without a
position, pre-norm blocks with LayerScale, q/k/v projections, an exact-GELU MLP
(or SwiGLU for ViT-g), and a final LayerNorm with eps 1e-6. The token order is
[CLS, registers..., patches (row-major)], as in DINOv3, and the public surface
(`encode_image`, `patch_tokens`, the output fields, `load`) is DINOv3's.

The position table is learned for a square grid of `image_size // patch_size`
patches a side. Any other grid gets the patch part of the table resized to it
exactly as transformers does (the CLS entry kept): PyTorch's
`F.interpolate(mode="bicubic", align_corners=False, size=grid)` in float32,
which maps output index i to the source (i + 0.5) * in / out - 0.5. The two
transformers classes differ there: `Dinov2Model` interpolates without
antialiasing (Keys cubic, a = -0.75, border replicated; `resize.interp_matrix`),
`Dinov2WithRegistersModel` with `antialias=True` (PIL's cubic, a = -0.5, the
kernel widened by in/out when shrinking, taps outside the table dropped and the
weights renormalised). `pos_antialias` selects the second. Meta's own code for
the models without registers scales by (grid + 0.1) / side instead
(`interpolate_offset`); transformers' converted models, which we match, do not.

`mask_token` of the PyTorch models is deliberately absent: it only replaces
masked patches during iBOT training. The converter drops it by name.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssvp_jax.models import attention, bundle, dense, resize
from ssvp_jax.models.dinov3 import DINOv3Output, LayerScale, Mlp, StructuralViT

Array = jax.Array
_ACTIVATIONS = ("gelu", "silu")
DINOv2Output = DINOv3Output  # the same fields and meaning: [CLS, registers, patches] taps + final-norm output


@dataclasses.dataclass(frozen=True)
class DINOv2Config:
  """Architecture of a DINOv2 ViT; field names follow DINOv3Config (and transformers' meaning).

  `image_size` is the native input size: the position table covers
  (image_size // patch_size)^2 patches. `intermediate_size` is the MLP width
  (for SwiGLU the width of each of gate and up, 4096 for ViT-g). `hidden_act`
  is the plain MLP's activation ("gelu": exact GELU); the gated MLP is SwiGLU,
  so `use_gated_mlp` requires "silu". `pos_antialias`: resize the position
  table as `Dinov2WithRegistersModel` does (True) or as `Dinov2Model` (False).
  """
  hidden_size: int = 1024
  num_layers: int = 24
  num_heads: int = 16
  intermediate_size: int = 4096
  patch_size: int = 14
  image_size: int = 518
  num_channels: int = 3
  num_register_tokens: int = 0
  layer_norm_eps: float = 1e-6
  use_gated_mlp: bool = False
  hidden_act: str = "gelu"
  qkv_bias: bool = True
  pos_antialias: bool = False

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {_ACTIVATIONS}")
    if self.use_gated_mlp and self.hidden_act != "silu":
      raise ValueError("use_gated_mlp is DINOv2's SwiGLU: hidden_act must be 'silu'")
    if self.image_size < self.patch_size:
      raise ValueError(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def pos_grid(self) -> int:
    """Side of the square patch grid the position table was learned for."""
    return self.image_size // self.patch_size

  @property
  def num_prefix_tokens(self) -> int:
    """CLS + registers: the tokens before the patches."""
    return 1 + self.num_register_tokens

  @property
  def mlp_bias(self) -> bool:
    """Every DINOv2 MLP has biases (read by DINOv3's `Mlp`)."""
    return True

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "DINOv2Config":
    """Inverse of `to_dict`; unknown keys are an error (a bundle from other code)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown DINOv2Config fields: {', '.join(unknown)}")
    return cls(**d)

  @classmethod
  def _released(cls, width: int, depth: int, heads: int, registers: bool, giant: bool = False) -> "DINOv2Config":
    # facebook/dinov2-* (and -with-registers): patch 14, table for 518 px (37 x 37), MLP ratio 4;
    # ViT-g's SwiGLU keeps 2/3 of 4 * 1536 rounded up to a multiple of 8: 4096.
    return cls(hidden_size=width, num_layers=depth, num_heads=heads,
               intermediate_size=4096 if giant else 4 * width, patch_size=14, image_size=518,
               num_register_tokens=4 if registers else 0, use_gated_mlp=giant,
               hidden_act="silu" if giant else "gelu", pos_antialias=registers)

  @classmethod
  def vits14(cls, registers: bool = False) -> "DINOv2Config":
    """ViT-S/14 (facebook/dinov2-small, or -with-registers-small)."""
    return cls._released(384, 12, 6, registers)

  @classmethod
  def vitb14(cls, registers: bool = False) -> "DINOv2Config":
    """ViT-B/14 (facebook/dinov2-base, or -with-registers-base)."""
    return cls._released(768, 12, 12, registers)

  @classmethod
  def vitl14(cls, registers: bool = False) -> "DINOv2Config":
    """ViT-L/14 (facebook/dinov2-large, or -with-registers-large)."""
    return cls._released(1024, 24, 16, registers)

  @classmethod
  def vitg14(cls, registers: bool = False) -> "DINOv2Config":
    """ViT-g/14 with SwiGLU (facebook/dinov2-giant, or -with-registers-giant)."""
    return cls._released(1536, 40, 24, registers, giant=True)


# Random-weight presets (`config.backbones.structural.random_init`), named as ssvp_jax.models.clip.PRESETS;
# each gives the token grid of the CLIP preset of the same name at its own `image_size` (configs/tiny.py:
# 4 x 4, configs/demo.py: 14 x 14; "demo" at 196 px for configs/demo_vitb.py's 14 x 14), which is also
# the native grid of its position table.
PRESETS = {
    "tiny": lambda: DINOv2Config(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=44, patch_size=4,
                                 image_size=16, num_register_tokens=1, pos_antialias=True),
    "small": lambda: DINOv2Config(hidden_size=96, num_layers=4, num_heads=4, intermediate_size=256, patch_size=8,
                                  image_size=112),
    "demo": lambda: DINOv2Config(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                                 patch_size=14, image_size=196),
}


# ----------------------------------------------------------------------------- position table

def _pil_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
  """The cubic filter of PyTorch's antialiased bicubic (PIL's, a = -0.5), at distances x."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = (((x - 5) * x + 8) * x - 4) * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def antialias_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] matrix of `F.interpolate(mode="bicubic", antialias=True, align_corners=False)`.

  Output i is centred on source position (i + 0.5) * in / out; when shrinking the
  filter is stretched by in / out (support 2 * in / out), and the taps that fall
  inside [0, in) are weighted and normalised to sum to one.
  """
  scale = in_size / out_size
  stretch = max(scale, 1.0)
  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    centre = scale * (i + 0.5)
    lo = max(int(centre - 2.0 * stretch + 0.5), 0)
    hi = min(int(centre + 2.0 * stretch + 0.5), in_size)
    taps = np.arange(lo, hi)
    w = _pil_cubic((taps - centre + 0.5) / stretch)
    m[i, lo:hi] = w / w.sum()
  m.setflags(write=False)
  return m


def resize_matrix(in_size: int, out_size: int, antialias: bool) -> np.ndarray:
  """[out, in] bicubic resize matrix along one axis, as transformers' DINOv2 classes use it."""
  return antialias_matrix(in_size, out_size) if antialias else resize.interp_matrix(in_size, out_size, "bicubic")


def resize_pos_table(table: Array, grid: tuple[int, int], side: int, antialias: bool) -> Array:
  """table [1 + side^2, D] -> [1 + gh * gw, D] for a gh x gw patch grid; the CLS entry is kept.

  Computed in float32 (as transformers does) and cast back to the table's dtype.
  """
  gh, gw = grid
  if (gh, gw) == (side, side):
    return table
  patches = table[1:].astype(jnp.float32).reshape(side, side, -1)  # [side, side, D], row-major
  mh = jnp.asarray(resize_matrix(side, gh, antialias), jnp.float32)  # [gh, side]
  mw = jnp.asarray(resize_matrix(side, gw, antialias), jnp.float32)  # [gw, side]
  out = jnp.einsum("Yy,yxd,Xx->YXd", mh, patches, mw, precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([table[:1], out.reshape(gh * gw, -1).astype(table.dtype)], axis=0)


# ----------------------------------------------------------------------------- layers

def _dense(d_in: int, d_out: int, use_bias: bool, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
  # transformers' init (truncated normal, std 0.02); real weights are loaded over it.
  return dense.Linear(d_in, d_out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=nnx.initializers.truncated_normal(0.02), rngs=rngs)


def _layer_norm(cfg: DINOv2Config, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # DINOv2's eps is 1e-6 (Flax's default too, but said explicitly); two-pass variance as in PyTorch.
  return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, use_fast_variance=False, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)


class Attention(nnx.Module):
  """Multi-head self-attention (no positional term: DINOv2's positions are added once, at the input)."""

  def __init__(self, cfg: DINOv2Config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
    self.q = _dense(d, d, cfg.qkv_bias, dtype, param_dtype, rngs)
    self.k = _dense(d, d, cfg.qkv_bias, dtype, param_dtype, rngs)
    self.v = _dense(d, d, cfg.qkv_bias, dtype, param_dtype, rngs)
    self.o = _dense(d, d, True, dtype, param_dtype, rngs)

  def __call__(self, x: Array) -> Array:
    b, t, _ = x.shape
    heads = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)  # [B, T, H, Dh]
    out = attention.dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)))  # [B, T, H, Dh]
    return self.o(out.reshape(b, t, -1))


class Block(nnx.Module):
  """Pre-norm transformer block: x + ls1(attn(norm1 x)), then + ls2(mlp(norm2 x)).

  The MLP (exact GELU, or SwiGLU when gated) and LayerScale are DINOv3's: the same layers.
  """

  def __init__(self, cfg: DINOv2Config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = _layer_norm(cfg, **kw)
    self.attn = Attention(cfg, **kw)
    self.ls1 = LayerScale(cfg.hidden_size, param_dtype=param_dtype)
    self.norm2 = _layer_norm(cfg, **kw)
    self.mlp = Mlp(cfg, **kw)
    self.ls2 = LayerScale(cfg.hidden_size, param_dtype=param_dtype)

  def __call__(self, x: Array) -> Array:
    x = x + self.ls1(self.attn(self.norm1(x)))
    return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv2(StructuralViT, nnx.Module):
  """DINOv2 ViT. `encode_image` is the entry point; `__call__` is the same."""

  def __init__(self, cfg: DINOv2Config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    d, p = cfg.hidden_size, cfg.patch_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    init = nnx.initializers.truncated_normal(0.02)
    self.patch_embed = nnx.Conv(cfg.num_channels, d, (p, p), strides=(p, p), padding="VALID", kernel_init=init,
                                **kw)
    self.cls_token = nnx.Param(init(rngs.params(), (1, 1, d), param_dtype))
    self.register_tokens = nnx.Param(init(rngs.params(), (1, cfg.num_register_tokens, d), param_dtype))
    self.pos_embed = nnx.Param(init(rngs.params(), (1 + cfg.pos_grid ** 2, d), param_dtype))  # [1 + M^2, D]
    self.layers = nnx.List([Block(cfg, **kw) for _ in range(cfg.num_layers)])
    self.norm = _layer_norm(cfg, **kw)

  def embed(self, images: Array) -> Array:
    """images [B, H, W, C] (normalised) -> tokens [B, 1 + R + N, D] before the first block."""
    b, h, w, c = images.shape
    p = self.cfg.patch_size
    if h % p or w % p:
      raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
    if c != self.cfg.num_channels:
      raise ValueError(f"images have {c} channels, the model takes {self.cfg.num_channels} (NHWC expected)")
    x = self.patch_embed(images.astype(self.dtype))  # [B, h, w, D]
    x = x.reshape(b, -1, x.shape[-1])  # [B, N, D], row-major like PyTorch's flatten(2)
    cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, x.shape[-1]))
    pos = resize_pos_table(self.pos_embed[...], (h // p, w // p), self.cfg.pos_grid, self.cfg.pos_antialias)
    x = jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype)  # [B, 1 + N, D]
    regs = jnp.broadcast_to(self.register_tokens[...].astype(x.dtype), (b,) + self.register_tokens.shape[1:])
    return jnp.concatenate([x[:, :1], regs, x[:, 1:]], axis=1)  # registers carry no position

  def block_inputs(self, images: Array) -> tuple[Array, ...]:
    return ()  # learned positions, added once in `embed`


def param_count(cfg: DINOv2Config) -> int:
  """Number of parameters of the module for `cfg`, without allocating them."""
  return sum(int(np.prod(s)) for s in param_shapes(cfg).values())


def param_shapes(cfg: DINOv2Config) -> dict[str, tuple[int, ...]]:
  """{flat parameter name: shape} of the module for `cfg` (the bundle's keys), without allocating."""
  return bundle.param_shapes(nnx.eval_shape(lambda: DINOv2(cfg, rngs=nnx.Rngs(0))))


def load(bundle_dir: str, *, dtype=jnp.float32, param_dtype=jnp.float32) -> DINOv2:
  """Builds a DINOv2 from a bundle written by `convert/dinov2.py` (strict: every weight must fit).

  `dtype` is the compute dtype, `param_dtype` the storage dtype of the weights.
  """
  cfg_dict, flat = bundle.read_bundle(bundle_dir, "dinov2")
  cfg = DINOv2Config.from_dict(cfg_dict)
  model = bundle.zeros_module(lambda: DINOv2(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  bundle.assign_params(model, flat, source=bundle_dir)
  return model


def build(section, *, dtype, rngs: nnx.Rngs) -> DINOv2:
  """The registry's entry (ssvp_jax/models/registry.py): `section.bundle` or the preset `section.random_init`."""
  if section.bundle:
    return load(section.bundle, dtype=dtype)
  return DINOv2(PRESETS[section.random_init](), dtype=dtype, rngs=rngs)
