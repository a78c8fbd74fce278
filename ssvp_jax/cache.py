"""Frozen-feature cache: each training image's tapped backbone features, computed once, read after.

The backbones are frozen and training applies no augmentation, so an image's `SSVP.features` are
the same in every epoch. With `config.cache.enabled` the first epoch decodes the images, runs the
backbones (jitted `model.features`) and writes one entry per image; later epochs read the entries
and run only the heads; the images are not even decoded again.

Layout (content-addressed, safe to share between runs and machines):

    DIR/<fingerprint>/info.json                         what the fingerprint covers (for humans)
    DIR/<fingerprint>/<ab>/<image digest>-<mask digest>.safetensors

* `fingerprint` hashes everything the features depend on besides the image: the backbones'
  variables themselves (not file names), their architecture configs, the tapped layers, the views
  (resolution, mean/std), the mask size, the `backbones` config sections (name, local-token mode
  D3, ...; minus the bundle paths), the compute dtype (`config.dtype`) and the storage dtype.
  Changing any of them starts a new folder; old folders can simply be deleted.
* the entry name hashes the image file's bytes (and the mask file's bytes): an edited image is a
  different entry, a renamed or copied one the same.

An entry is one safetensors file (a format made for arrays: a JSON header, raw little-endian
buffers, no pickle, readable by memory map) holding one array per `Features` field and tap
(`semantic_local.<l>` [N, C], `semantic_global` [E], `structural_local.<l>` [N, D],
`structural_global` [D]) and `mask` [S, S] uint8. One file per image makes
writes independent and atomic (temporary file + `os.replace`), so concurrent writers of the same
entry never leave a torn file. bfloat16 travels as raw uint16 bits (safetensors' NumPy reader
has no bfloat16) with the dtype named in the header's metadata.

Integrity: the header's metadata carries a checksum of the stored arrays, verified on every read.
An entry that does not parse, fails its checksum, or holds a non-finite value is logged by name and
treated as missing: its batch is recomputed and the entry rewritten. Temporary files that a killed
writer left behind are removed when the cache opens (ssvp_jax/fileio.py: remove_stale_temps).
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import logging
import os
from typing import Any, Callable, Iterator, Sequence

import jax
import ml_collections
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from ssvp_jax import distributed, fileio, sharding
from ssvp_jax.data.pipeline import View, load_example
from ssvp_jax.data.records import Record
from ssvp_jax.models.ssvp import SSVP, Features

log = logging.getLogger("ssvp_jax")

FORMAT_VERSION = 3  # 2: entries carry a checksum; 3: arrays named by backbone role
DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
          "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_CHUNK = 1 << 20


class CacheError(ValueError):
  """A cache entry cannot be read: names the file and the problem."""


# ------------------------------------------------------------------------------------ hashing


def _hash_file(path: str) -> str:
  h = hashlib.blake2b(digest_size=16)
  try:
    with open(path, "rb") as f:
      while chunk := f.read(_CHUNK):
        h.update(chunk)
  except OSError as e:
    raise CacheError(f"{path}: cannot read for the feature-cache key ({e})") from e
  return h.hexdigest()


def params_digest(module: nnx.Module) -> str:
  """blake2b of every variable of `module` (path, dtype, shape, bytes), in path order.

  Hashes the values, not a file name: a re-converted or re-initialised backbone is a new key.
  A few seconds for a ViT-L pair, paid once per run (measured, docs/scaling.md "Frozen-feature cache").
  """
  flat = sorted(nnx.to_flat_state(nnx.state(module, nnx.Not(nnx.RngState))), key=lambda kv: str(kv[0]))
  # gathered when sharded over processes
  return fileio.digest_arrays(('.'.join(map(str, path)), sharding.to_host(var[...])) for path, var in flat)


def _config_section(section: ml_collections.ConfigDict) -> dict:
  d = section.to_dict()
  d.pop("bundle", None)  # the weights are hashed by value; the folder may move
  return d


def key_description(model: SSVP, config: ml_collections.ConfigDict, views: Sequence[View], mask_size: int,
                    dtype: str) -> dict:
  """Everything besides the image that an entry depends on (hashed into the fingerprint)."""
  out = {
      "format_version": FORMAT_VERSION,
      "views": [[v.name, v.size, list(v.mean), list(v.std)] for v in views],
      "mask_size": mask_size,
      "compute_dtype": str(config.get("dtype") or "float32"),  # bf16 backbones give other features
      "dtype": dtype,
  }
  for role, backbone, layers in (("semantic", model.semantic, model.semantic_layers),
                                 ("structural", model.structural, model.structural_layers)):
    out[role] = {"params": params_digest(backbone), "arch": repr(_arch(backbone)), "layers": list(layers),
                 "config": _config_section(config.backbones[role])}
  return out


def _arch(backbone) -> Any:
  """A backbone's architecture config (our modules keep it as `config` or `cfg`)."""
  return getattr(backbone, "config", None) or getattr(backbone, "cfg")


def fingerprint(description: dict) -> str:
  """Short hex digest of a `key_description`."""
  blob = json.dumps(description, sort_keys=True, default=str).encode()
  return hashlib.blake2b(blob, digest_size=12).hexdigest()


# ------------------------------------------------------------------------------------ entries


def checksum(tensors: dict[str, np.ndarray]) -> str:
  """Digest of the stored arrays (name, dtype, shape, bytes) in name order."""
  return fileio.digest_arrays((name, tensors[name]) for name in sorted(tensors))


def _to_storage(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
  with np.errstate(over="ignore"):  # float16 overflow is detected and reported by the callers
    a = np.ascontiguousarray(np.asarray(a).astype(dtype))
  return a.view(np.uint16) if dtype == DTYPES["bfloat16"] else a


def _array_names(field: str, num_taps: int) -> list[str]:
  """The stored arrays of one Features field: one per tap for the local fields (tuples), else one."""
  return [f"{field}.{l}" for l in range(num_taps)] if field.endswith("_local") else [field]


def _one(feats: Features, b: int) -> dict[str, np.ndarray]:
  """Image `b` of a batch of features as flat named arrays."""
  out = {}
  for field, value in feats._asdict().items():
    arrays = value if isinstance(value, tuple) else (value,)
    out.update({name: a[b] for name, a in zip(_array_names(field, len(arrays)), arrays, strict=True)})
  return out


def entry_names(num_taps: int) -> set[str]:
  """The arrays of one entry: every Features field (per tap for the local ones) and the mask."""
  return {name for f in Features._fields for name in _array_names(f, num_taps)} | {"mask"}


def _stack(entries: Sequence[dict[str, np.ndarray]], num_taps: int) -> Features:
  def s(name):
    return np.stack([e[name] for e in entries])
  fields = {f: [s(name) for name in _array_names(f, num_taps)] for f in Features._fields}
  return Features(**{f: tuple(v) if f.endswith("_local") else v[0] for f, v in fields.items()})


def round_trip(feats: Features, dtype: str) -> Features:
  """The float32 features a reader gets back after storage in `dtype` (identity for float32)."""
  dt = DTYPES[dtype]
  with np.errstate(over="ignore"):  # checked just below, with a message that says what to do
    out = jax.tree.map(lambda a: np.asarray(a).astype(dt).astype(np.float32), feats)
  finite = lambda tree: all(np.isfinite(a).all() for a in jax.tree.leaves(tree))  # noqa: E731
  if dtype == "float16" and finite(feats) and not finite(out):
    # Raised here, before training on inf, not later from the background write.
    raise CacheError("backbone features overflow float16 (max 65504): use --config.cache.dtype=bfloat16 "
                     "(or float32)")
  return out


class FeatureCache:
  """One fingerprint's folder of entries; also serves training batches from it (`batches`)."""

  def __init__(self, root: str, description: dict, num_taps: int):
    dtype = description["dtype"]
    if dtype not in DTYPES:
      raise ValueError(f"config.cache.dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    self.dtype = DTYPES[dtype]
    self.dtype_name = dtype
    self.num_taps = num_taps
    self.mask_size = description["mask_size"]
    self.fingerprint = fingerprint(description)
    self.directory = os.path.join(root, self.fingerprint)
    os.makedirs(self.directory, exist_ok=True)
    info = os.path.join(self.directory, "info.json")
    if not os.path.exists(info):
      fileio.atomic_write(info, json.dumps(description, indent=2, sort_keys=True, default=str).encode())
    self._remove_orphans()
    self._digests: dict[str, tuple[int, int, str]] = {}  # path -> (mtime_ns, size, digest)

  # ---------------------------------------------------------------- keys and single entries

  def _digest(self, path: str) -> str:
    """Content digest of a file, memoised by (mtime, size) so later epochs do not re-read it."""
    try:
      st = os.stat(path)
    except OSError as e:
      raise CacheError(f"{path}: cannot read for the feature-cache key ({e})") from e
    memo = self._digests.get(path)
    if memo and memo[:2] == (st.st_mtime_ns, st.st_size):
      return memo[2]
    digest = _hash_file(path)
    self._digests[path] = (st.st_mtime_ns, st.st_size, digest)
    return digest

  def entry_path(self, record: Record) -> str:
    """Where `record`'s entry lives: image bytes + mask bytes under this fingerprint."""
    image = self._digest(record.image_path)
    mask = self._digest(record.mask_path) if record.mask_path else "nomask"
    return os.path.join(self.directory, image[:2], f"{image}-{mask[:16]}.safetensors")

  def store(self, record: Record, arrays: dict[str, np.ndarray], mask: np.ndarray) -> str:
    """Writes one image's features (flat names, see `_one`) and its [S, S] mask; returns the path."""
    path = self.entry_path(record)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tensors = {k: _to_storage(v, self.dtype) for k, v in arrays.items()}
    if self.dtype == DTYPES["float16"]:
      bad = [k for k, v in tensors.items() if not np.isfinite(v).all()]
      if bad:  # float16 ends at 65504; a residual stream with outliers overflows, bfloat16 does not
        raise CacheError(f"{path}: features {bad} of {record.image_path} overflow float16: use "
                         "--config.cache.dtype=bfloat16 (or float32)")
    tensors["mask"] = np.ascontiguousarray(np.asarray(mask) > 0.5, dtype=np.uint8)
    meta = {"format_version": str(FORMAT_VERSION), "dtype": self.dtype_name, "image": record.image_path,
            "checksum": checksum(tensors)}
    fileio.atomic_write(path, st_save(tensors, metadata=meta))
    return path

  def _remove_orphans(self) -> None:
    for sub in [self.directory] + [e.path for e in os.scandir(self.directory) if e.is_dir()]:
      for path in fileio.remove_stale_temps(sub):
        log.info("feature cache: removed %s, left by an interrupted writer", path)

  def load(self, record: Record) -> tuple[dict[str, np.ndarray], np.ndarray] | None:
    """(float32 features by flat name, float32 [S, S] mask) of `record`, or None when not cached or
    damaged (logged by name; the caller recomputes and rewrites it)."""
    path = self.entry_path(record)
    try:
      with open(path, "rb") as f:
        data = f.read()
    except FileNotFoundError:
      return None
    try:
      return self._check(path, data)
    except CacheError as e:
      log.warning("%s; recomputing it", e)
      return None

  def _check(self, path: str, data: bytes) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Parses an entry and verifies it: checksum, names, mask shape, finite values (CacheError if not)."""
    try:
      tensors = st_load(data)
      stored = json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__", {}).get("checksum")
    except Exception as e:  # safetensors raises its own error types for a bad header
      raise CacheError(f"{path}: unreadable feature-cache entry ({type(e).__name__}: {e})") from e
    if stored != checksum(tensors):
      raise CacheError(f"{path}: feature-cache entry fails its checksum (damaged on disk)")
    expected = entry_names(self.num_taps)
    if set(tensors) != expected:
      raise CacheError(f"{path}: feature-cache entry holds {sorted(tensors)}, expected {sorted(expected)}")
    mask = tensors.pop("mask").astype(np.float32)
    if mask.shape != (self.mask_size, self.mask_size):
      raise CacheError(f"{path}: cached mask is {mask.shape}, expected {(self.mask_size, self.mask_size)}")
    if self.dtype == DTYPES["bfloat16"]:
      tensors = {k: v.view(ml_dtypes.bfloat16) for k, v in tensors.items()}
    out = {k: v.astype(np.float32) for k, v in tensors.items()}
    bad = [k for k, v in out.items() if not np.isfinite(v).all()]
    if bad:
      raise CacheError(f"{path}: feature-cache entry holds non-finite values in {bad}")
    return out, mask

  # ---------------------------------------------------------------- training batches

  def batches(self, features: Callable[[np.ndarray, np.ndarray], Features], records: Sequence[Record],
              views: Sequence[View], *, batch_size: int, seed: int, epoch: int, skip: int = 0,
              num_threads: int = 2, lookahead: int = 2) -> Iterator[dict | None]:
    """One training epoch as this process's rows of each global batch {"features": Features, "mask",
    "label", "index"} (NumPy; all rows in a one-process run).

    Same order and composition as `distributed.train_batches` with the same (seed, epoch), so losses
    match the uncached loop. A batch whose entries all exist (in every process) is read from disk;
    otherwise each process decodes its rows and calls `features(semantic_rows, structural_rows)` -> their
    Features (in several processes a collective call over the global batch: `trainer._feature_pass`),
    and writes its rows' entries (in the background; the generator waits for the writes before it ends).
    The first `skip` batches (already trained before a resume) are yielded as None, uncomputed.
    """
    groups = distributed.epoch_rows(len(records), batch_size, seed, epoch)  # [steps, this process's rows]

    def fetch(i: int):
      got = self.load(records[i])
      return got if got is not None else load_example(records[i], views, self.mask_size, index=i)

    pool = concurrent.futures.ThreadPoolExecutor(max(1, num_threads))
    writes: list[concurrent.futures.Future] = []
    pending: collections.deque = collections.deque()

    def submit(j: int):
      pending.append([pool.submit(fetch, int(i)) for i in groups[j]])

    try:
      for j in range(skip, min(skip + lookahead, len(groups))):
        submit(j)
      for j in range(len(groups)):
        if j < skip:
          yield None
          continue
        items = [f.result() for f in pending.popleft()]
        if j + lookahead < len(groups):
          submit(j + lookahead)
        group = groups[j]
        if not distributed.any_process(not all(isinstance(it, tuple) for it in items)):
          feats = _stack([it[0] for it in items], self.num_taps)
          mask = np.stack([it[1] for it in items])
        else:
          # Some entry is missing (here or in another process): decode the whole batch (hits too:
          # rare) and recompute it, so the backbones always see full batches of one shape (one
          # compilation) and every process joins the collective call.
          exs = [it if isinstance(it, dict) else load_example(records[i], views, self.mask_size, index=int(i))
                 for it, i in zip(items, group)]
          semantic_images = np.stack([e["semantic"] for e in exs])  # [rows, Hs, Ws, 3]
          structural_images = np.stack([e["structural"] for e in exs])  # [rows, Hd, Wd, 3]
          feats = jax.tree.map(np.asarray, features(semantic_images, structural_images))
          mask = np.stack([e["mask"] for e in exs])
          for b, i in enumerate(group):
            writes.append(pool.submit(self.store, records[i], _one(feats, b), mask[b]))
          # Train on what later epochs will read back, so every epoch sees the same numbers.
          feats = round_trip(feats, self.dtype_name)
        yield {"features": feats, "mask": mask.astype(np.float32),
               "label": np.array([records[i].label for i in group], np.int32),
               "index": group.astype(np.int32)}
    finally:
      for f in writes:
        f.result()  # surface write errors; the next epoch needs the entries
      pool.shutdown(wait=True, cancel_futures=True)


def from_config(config: ml_collections.ConfigDict, workdir: str, model: SSVP,
                views: Sequence[View]) -> FeatureCache | None:
  """The run's FeatureCache, or None when `config.cache.enabled` is off (or the section is absent).

  `config.cache.dir` may contain "{workdir}"; the mask size is the first view's (as in training).
  """
  section = config.get("cache")
  if section is None or not section.enabled:
    return None
  root = section.dir.replace("{workdir}", workdir)
  mask_size = views[0].size
  description = key_description(model, config, views, mask_size, section.dtype)
  return FeatureCache(root, description, len(model.semantic_layers))
