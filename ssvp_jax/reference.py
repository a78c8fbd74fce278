"""Few-shot and training-free detection from a reference patch bank (issue 10; docs/reference_bank.md).

A bank holds the L2-normalised patch tokens of k good images of one category, taken from the frozen
features (`SSVP.features`: the feature cache and the sharding serve it too) at the taps that
`config.reference` selects; the backbones and the heads know nothing of it.

    bank = build_bank(ref_layers, spec)                 # ref_layers: L' x [k, N, D] from `select`
    dist, score = score_patches(bank, query_layers, spec)   # [B, N] distances, [B] image scores

Scoring (AnomalyDINO, PatchCore without the coreset by default):
  d_l(p)   = 1 - max_m <q_l(p), r_l(m)>     cosine distance of query patch p to its nearest reference
                                            patch at tap l (exact nearest neighbour: chunked matmul)
  d(p)     = mean_l d_l(p)                  combined over the selected taps
  z(p)     = d(p) / scale                   `scale`: the normal-distance level of the references
  score    = mean of the top `top_percent` % of z(p) over the patches (AnomalyDINO: top 1 %)
  map      = g(postprocess(z)),  g(z) = z / (1 + z)   upsampled and smoothed exactly as the zero-shot
                                            map (maps.postprocess), squashed into [0, 1): g = 1/2 at
                                            the normal scale; score likewise g(score)
  fused    = (1 - w) * zero-shot + w * bank   for maps and scores alike (w = config.reference.weight)

`scale` comes from the references alone (leave-one-out): each reference image is scored against the
bank without its own patches, and `scale` is the mean of those k image scores (before g). With a
single reference there is no other image: each of its patches is scored against its other patches.

Mutual scoring (MuSc, ICLR 2024; transductive, no labelled image): the bank of each test image is the
other test images of its category. For a patch p of image i and every other image j, d_j(p) is the
distance to p's nearest patch of j (combined over taps as above); since defects are rare, the score
is the mean of the lowest `mutual_lowest` fraction of {d_j(p)} (at least one image), so a defect that
a few other images share still scores high.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ssvp_jax import cache, evaluate, fileio
from ssvp_jax import maps as maps_lib
from ssvp_jax.data.pipeline import views
from ssvp_jax.errors import UserError
from ssvp_jax.models.backbone import ROLES
from ssvp_jax.models.ssvp import SSVP, Features

BACKBONES = ROLES
DEFAULTS = dict(
    shots=0,                   # K references per category in evaluate (0: no few-shot rows; --shots)
    seeds=3,                   # draws of the K references (seeds 0..seeds-1); reports give mean and std
    backbones=ROLES,           # which backbones' patch tokens feed the bank ("semantic", "structural")
    taps=(-1,),                # positions in backbones.<role>.layers (0-based, negative from the end); () =
                               # every tap. The last tap of each backbone (AnomalyDINO's choice): on the
                               # demo as accurate as all four (docs/reference_bank.md) at a quarter of the cost
    top_percent=1.0,           # image score: mean of the top 1 % patch distances (AnomalyDINO)
    weight=0.8,                # fusion: 0 = zero-shot only, 1 = bank only (measured, docs/reference_bank.md)
    coreset=0.0,               # fraction of bank patches kept by greedy coreset (PatchCore); 0 = all
    chunk=4096,                # bank rows per matmul chunk (bounds memory: B x N x chunk floats)
    mutual=False,              # also report mutual scoring on the unlabelled test images (transductive)
    mutual_lowest=0.1,         # mutual: mean of the lowest 10 % of the distances to the other images
)
_PAD = -2  # owner of padding rows (never equal to a query's owner, which is >= -1)


class Spec(NamedTuple):
  """The static part of `config.reference` the jitted functions need (hashable)."""
  backbones: tuple[str, ...]
  taps: tuple[int, ...]
  top_percent: float
  chunk: int


class Bank(NamedTuple):
  """A reference bank: a pytree of arrays (an argument of jitted and exported functions)."""
  layers: tuple[jax.Array, ...]  # L' x [M, D_l]  unit-norm reference patches
  index: jax.Array               # [M] int32      global patch index: image * N + patch
  scale: jax.Array               # []  float32    normal-distance scale (leave-one-out)


def settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.reference` with defaults for missing keys (work directories trained before it existed)."""
  ref = dict(DEFAULTS)
  if "reference" in config:
    ref.update(config.reference.to_dict())
  unknown = set(ref) - set(DEFAULTS)
  if unknown:
    raise ValueError(f"config.reference has unknown keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
  bad = [b for b in ref["backbones"] if b not in BACKBONES]
  if bad or not ref["backbones"]:
    raise ValueError(f"config.reference.backbones={tuple(ref['backbones'])} must name some of {BACKBONES}")
  if not 0 < ref["top_percent"] <= 100:
    raise ValueError(f"config.reference.top_percent={ref['top_percent']} must be in (0, 100]")
  if not 0 <= ref["weight"] <= 1:
    raise ValueError(f"config.reference.weight={ref['weight']} must be in [0, 1]")
  if not 0 <= ref["coreset"] <= 1:
    raise ValueError(f"config.reference.coreset={ref['coreset']} must be in [0, 1] (0: off)")
  return ml_collections.ConfigDict(ref)


def spec(config: ml_collections.ConfigDict) -> Spec:
  ref = settings(config)
  return Spec(tuple(ref.backbones), tuple(int(t) for t in ref.taps), float(ref.top_percent), int(ref.chunk))


# ------------------------------------------------------------------------------------------------
# Patch features
# ------------------------------------------------------------------------------------------------

def select(feats: Features, spec: Spec) -> tuple[jax.Array, ...]:
  """The taps that feed the bank, L2-normalised in float32: L' x [B, N, D_l]."""
  out = []
  for name in spec.backbones:
    taps = feats.semantic_local if name == "semantic" else feats.structural_local
    which = spec.taps or tuple(range(len(taps)))
    for t in which:
      if not -len(taps) <= t < len(taps):
        raise ValueError(f"config.reference.taps={spec.taps}: {name} has {len(taps)} taps")
      out.append(normalize(taps[t]))
  return tuple(out)


def selected_features(model: SSVP, semantic_images, structural_images, spec: Spec) -> tuple[jax.Array, ...]:
  """The backbones, then `select`; jit with `functional.Bound(selected_features, model)(ci, di, spec=)`."""
  return select(model.features(semantic_images, structural_images), spec)


def normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ------------------------------------------------------------------------------------------------
# Nearest neighbours
# ------------------------------------------------------------------------------------------------

def max_similarity(query: jax.Array, bank: jax.Array, bank_owner: jax.Array, query_owner: jax.Array,
                   chunk: int) -> jax.Array:
  """max_m <query[b, n], bank[m]> over bank rows whose owner differs from query_owner[b, n]: [B, N].

  query [B, N, D], bank [M, D] (both unit-norm), bank_owner [M], query_owner [B, N] (-1: exclude
  nothing). The bank is walked in chunks of `chunk` rows (lax.scan), so memory is B x N x chunk.
  """
  m, d = bank.shape
  c = max(1, min(chunk, m))
  n_chunks = -(-m // c)
  pad = n_chunks * c - m
  rows = jnp.pad(bank, ((0, pad), (0, 0))).reshape(n_chunks, c, d)
  owners = jnp.pad(bank_owner, (0, pad), constant_values=_PAD).reshape(n_chunks, c)

  def body(best, xs):
    r, o = xs                                          # [c, D], [c]
    sim = jnp.einsum("bnd,md->bnm", query, r)          # [B, N, c]
    drop = (o[None, None, :] == query_owner[:, :, None]) | (o == _PAD)[None, None, :]
    return jnp.maximum(best, jnp.where(drop, -jnp.inf, sim).max(-1)), None

  best, _ = jax.lax.scan(body, jnp.full(query.shape[:2], -jnp.inf, jnp.float32), (rows, owners))
  return best


def patch_distances(bank_layers: Sequence[jax.Array], bank_owner: jax.Array, query_layers: Sequence[jax.Array],
                    query_owner: jax.Array, chunk: int) -> jax.Array:
  """d(p) = mean over taps of 1 - (nearest cosine similarity): [B, N]."""
  d = [1.0 - max_similarity(q, b, bank_owner, query_owner, chunk) for q, b in zip(query_layers, bank_layers)]
  return sum(d) / len(d)


def top_mean(dist: jax.Array, top_percent: float) -> jax.Array:
  """[B, N] -> [B]: mean of the largest ceil(N * top_percent / 100) values (at least one)."""
  k = max(1, math.ceil(dist.shape[-1] * top_percent / 100.0 - 1e-9))
  return jax.lax.top_k(dist, k)[0].mean(-1)


def squash(z):
  """g(z) = z / (1 + z): normalised distances (1 = the references' normal level) -> [0, 1)."""
  return z / (1.0 + z)


def fuse(zero_shot, bank, weight: float):
  """(1 - w) * zero-shot + w * bank (maps or scores; NumPy or JAX)."""
  return (1.0 - weight) * zero_shot + weight * bank


# ------------------------------------------------------------------------------------------------
# Building a bank
# ------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("n_patches", "top_percent", "chunk"))
def _loo_scores(layers, index, ref_layers, n_patches: int, top_percent: float, chunk: int):
  """Leave-one-out image scores of the references (see the module docstring): [k]."""
  k = ref_layers[0].shape[0]
  if k == 1:   # one image: each patch against the image's other patches
    bank_owner, query_owner = index, jnp.arange(n_patches, dtype=jnp.int32)[None]
  else:        # each image against the other images
    bank_owner = index // n_patches
    query_owner = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32)[:, None], (k, n_patches))
  return top_mean(patch_distances(layers, bank_owner, ref_layers, query_owner, chunk), top_percent)


def loo_scale(layers: Sequence[jax.Array], index: jax.Array, ref_layers: Sequence[jax.Array], spec: Spec) -> jax.Array:
  """The normal-distance scale: the mean leave-one-out image score of the references."""
  n = ref_layers[0].shape[1]
  return _loo_scores(tuple(layers), index, tuple(ref_layers), n, spec.top_percent, spec.chunk).mean()


def build_bank(ref_layers: Sequence[np.ndarray | jax.Array], spec: Spec, coreset: float = 0.0,
               seed: int = 0) -> Bank:
  """A bank from the selected, normalised taps of k references (L' x [k, N, D], from `select`)."""
  ref_layers = tuple(jnp.asarray(r, jnp.float32) for r in ref_layers)
  k, n = ref_layers[0].shape[:2]
  layers = tuple(r.reshape(k * n, r.shape[-1]) for r in ref_layers)
  index = jnp.arange(k * n, dtype=jnp.int32)
  if 0 < coreset < 1:
    keep = greedy_coreset(layers, max(1, round(coreset * k * n)), seed)
    layers, index = tuple(x[keep] for x in layers), index[keep]
  return Bank(layers, index, loo_scale(layers, index, ref_layers, spec))


@functools.partial(jax.jit, static_argnames=("n_keep",))
def _greedy(x: jax.Array, n_keep: int) -> jax.Array:
  """Greedy k-centre selection (PatchCore): start at row 0, repeatedly add the farthest row."""
  def body(i, state):
    keep, dist = state
    new = x[keep[i - 1]]
    dist = jnp.minimum(dist, jnp.sum((x - new) ** 2, -1))
    return keep.at[i].set(jnp.argmax(dist).astype(jnp.int32)), dist
  keep = jnp.zeros(n_keep, jnp.int32)
  dist = jnp.full(x.shape[0], jnp.inf, jnp.float32)
  return jax.lax.fori_loop(1, n_keep, body, (keep, dist))[0]


def greedy_coreset(layers: Sequence[jax.Array], n_keep: int, seed: int = 0, dim: int = 128) -> jax.Array:
  """Indices of `n_keep` bank rows chosen by greedy k-centre on the concatenated taps, randomly
  projected to `dim` dimensions (PatchCore's speed-up; distances are approximately kept)."""
  x = jnp.concatenate(list(layers), axis=-1)
  if x.shape[-1] > dim:
    proj = jax.random.normal(jax.random.key(seed), (x.shape[-1], dim), jnp.float32) / math.sqrt(dim)
    x = x @ proj
  return jnp.sort(_greedy(x, n_keep))


# ------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------

def bank_outputs(bank: Bank, query_layers: Sequence[jax.Array], spec: Spec, size: int, sigma: float,
                 owner: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(map [B, S, S], score [B]) of one bank, both squashed into [0, 1) (module docstring).

  owner [B]: the bank image each query is (its own patches are left out: leave-one-out scoring of the
  references themselves, as calibrate needs), -1 for none; None: -1 for all.
  """
  b, n = query_layers[0].shape[:2]
  image = bank.index // n                                             # [M] the bank image of each row
  owner = jnp.full((b,), -1, jnp.int32) if owner is None else owner.astype(jnp.int32)
  query_owner = jnp.broadcast_to(owner[:, None], (b, n))
  z = patch_distances(bank.layers, image, query_layers, query_owner, spec.chunk) / bank.scale  # [B, N]
  side = int(round(n ** 0.5))
  amap = maps_lib.postprocess(z.reshape(b, side, side), size, sigma)
  return squash(amap), squash(top_mean(z, spec.top_percent))


def step(model: SSVP, semantic_images, structural_images, t_init, banks: tuple[Bank, ...], owner=None, *, spec: Spec,
         size: int, sigma: float, return_features: bool = False):
  """One forward for everything a few-shot evaluation needs; jit with `functional.Bound(step, model)`.

  Returns (zero_shot, per_bank, features): zero_shot is (map, s_global, s_local, s_final) as
  `evaluate.eval_step` when t_init [B, P, E] is given, else None (untrained heads: bank only);
  per_bank a tuple of (map, score) per bank; features the selected taps (or None); owner as in
  `bank_outputs`.
  """
  feats = model.features(semantic_images, structural_images)
  query = select(feats, spec)
  zero_shot = None if t_init is None else evaluate.head_outputs(model, feats, t_init, size, sigma)
  per_bank = tuple(bank_outputs(bank, query, spec, size, sigma, owner) for bank in banks)
  return zero_shot, per_bank, (query if return_features else None)


# ------------------------------------------------------------------------------------------------
# Mutual scoring (transductive)
# ------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("lowest",))
def _mutual_one(layers, i, lowest: float):
  """z(p) of test image i against the other images: [N]."""
  n_img = layers[0].shape[0]

  def to_image(j):  # d_j(p) for every patch p of image i: [N]
    return sum(1.0 - jnp.einsum("nd,md->nm", x[i], x[j]).max(-1) for x in layers) / len(layers)

  d = jax.lax.map(to_image, jnp.arange(n_img))                     # [n_img, N]
  d = jnp.where((jnp.arange(n_img) == i)[:, None], jnp.inf, d)     # not against itself
  r = max(1, math.ceil(lowest * (n_img - 1) - 1e-9))
  return -jax.lax.top_k(-d.T, r)[0].mean(-1)                       # mean of the r lowest, [N]


def mutual_scores(layers: Sequence[np.ndarray], spec: Spec, lowest: float, size: int, sigma: float
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Mutual scoring of n unlabelled images (L' x [n, N, D] normalised taps): (maps [n, S, S], scores [n]).

  Raw distances (no normal scale exists without references); the image score is the top-percent
  mean as for a bank.
  """
  layers = tuple(jnp.asarray(x) for x in layers)
  n_img, n = layers[0].shape[:2]
  if n_img < 2:
    raise ValueError(f"mutual scoring needs at least 2 images of a category, got {n_img}")
  side = int(round(n ** 0.5))
  maps, scores = [], []
  for i in range(n_img):
    z = _mutual_one(layers, i, float(lowest))[None]                 # [1, N]
    maps.append(np.asarray(maps_lib.postprocess(z.reshape(1, side, side), size, sigma))[0])
    scores.append(float(top_mean(z, spec.top_percent)[0]))
  return np.stack(maps), np.asarray(scores, np.float32)


# ------------------------------------------------------------------------------------------------
# A stored bank (calibrate writes it, predict and export read it)
# ------------------------------------------------------------------------------------------------

BANK_DIR = "reference"  # workdir/reference/<category>.npz


class BankError(UserError):
  """A stored bank cannot be used: names the file and the problem."""


def bank_path(workdir: str, category: str) -> str:
  """Where the bank of a category word lives in a work directory."""
  safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in category) or "_"
  return os.path.join(workdir, BANK_DIR, safe + ".npz")


def fingerprint(model: SSVP, config: ml_collections.ConfigDict) -> str:
  """What a bank's numbers depend on besides its images: the backbone weights (by value), their
  architectures, taps, resolutions and compute dtype (the feature cache's key), and the bank's spec."""
  desc = cache.key_description(model, config, views(config), mask_size=0, dtype="float32")
  desc["reference"] = spec(config)._asdict()
  return cache.fingerprint(desc)


def save_bank(path: str, bank: Bank, meta: dict) -> None:
  """Writes `bank` and `meta` (JSON-able; must hold "fingerprint") to `path` atomically."""
  arrays = {f"layer_{i:02d}": np.asarray(x) for i, x in enumerate(bank.layers)}
  arrays.update(index=np.asarray(bank.index), scale=np.asarray(bank.scale),
                meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with fileio.atomic_file(path, "wb") as f:  # a file object: np.savez would append ".npz" to a path
    np.savez(f, **arrays)


def load_bank(path: str, expected_fingerprint: str | None = None) -> tuple[Bank, dict]:
  """(bank, meta) from `path`; a bank built with other weights or resolution raises BankError."""
  try:
    with np.load(path) as f:
      meta = json.loads(bytes(f["meta"]).decode())
      n = sum(k.startswith("layer_") for k in f.files)
      bank = Bank(tuple(jnp.asarray(f[f"layer_{i:02d}"]) for i in range(n)), jnp.asarray(f["index"]),
                  jnp.asarray(f["scale"]))
  except (OSError, KeyError, ValueError) as e:
    raise BankError(f"{path}: not a readable reference bank ({type(e).__name__}: {e}); rebuild it with "
                    "python -m ssvp_jax.calibrate --good=DIR") from None
  if expected_fingerprint is not None and meta.get("fingerprint") != expected_fingerprint:
    raise BankError(f"{path}: this reference bank was built with other backbone weights, resolution or bank "
                    f"settings (fingerprint {meta.get('fingerprint')}, this model's {expected_fingerprint}); "
                    "rebuild it with python -m ssvp_jax.calibrate --good=DIR, or pass --no-reference")
  return bank, meta
