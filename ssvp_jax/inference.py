"""Scoring a user's image files: the one preprocessing + forward that predict, calibrate and export share.

    engine = inference.load_engine("runs/demo", category="object")
    for r in inference.score_files(engine, ["a.png", "b.jpg"]):
      print(r.path, r.error or r.score)

Each file is decoded as the evaluation path decodes a dataset image (`pipeline.load_image`: any
size, grayscale, RGBA, 16-bit), except that a user's photo is turned upright by its EXIF orientation
(D22; dataset images are read as stored), resized and normalised per backbone as
`pipeline.load_example` does, and run through `evaluate.eval_step`, so a file scores the same here as
in `evaluate.predict_records` when the category word is the same. A file that cannot be decoded gives
a result with `error` set; the others go on.

The image score is S_final (Eq. 19), computed for each image on its own (D15 "none"): a decision for
one image cannot depend on the other images of a batch, so a config trained with the transductive
"minmax" normalisation still scores images one by one here.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import logging
import math
import os
import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from PIL import Image

from ssvp_jax import checkpoint, evaluate, functional, reference
from ssvp_jax.data.common import DatasetError, is_image
from ssvp_jax.data.pipeline import DEFAULT_MAX_PIXELS, View, load_image, normalize, resize_image, views
from ssvp_jax.models.prompts import class_words, templates_for
from ssvp_jax.models.ssvp import SSVP

log = logging.getLogger("ssvp_jax")

DEFAULT_CATEGORY = "object"  # D4's class-agnostic word: a user's images have no benchmark category
CALIBRATION_FILE = "calibration.json"
OVERLAY_MAX_SIDE = 1024      # overlays of large photos are scaled down to this longer side


@dataclasses.dataclass
class Engine:
  """A trained model ready to score images of one category word."""
  model: SSVP
  config: ml_collections.ConfigDict
  category: str
  t_init: jax.Array          # [P, E] T_init of the category (Eq. 6), computed once
  views: tuple[View, View]   # the semantic and structural backbones' inputs (data.pipeline.views)
  step: int | None           # checkpoint step the heads come from
  tokenizer: object = None   # needed only by `with_category`
  bank: reference.Bank | None = None  # the category's reference bank (fused with weight config.reference.weight)
  bank_meta: dict | None = None       # what the stored bank says about itself (file, references, ...)

  def __post_init__(self):
    self._eval_step = functional.Bound(evaluate.eval_step, self.model)  # the model split once
    self._bank_step = functional.Bound(reference.step, self.model) if self.bank is not None else None

  @property
  def map_size(self) -> int:
    """Side of the anomaly maps: the CLIP input size, as in evaluation."""
    return int(self.config.backbones.semantic.image_size)

  @property
  def sigma(self) -> float:
    return float(self.config.eval.sigma)

  def with_category(self, category: str) -> "Engine":
    """The same model for another category word (T_init changes; a bank belongs to one category: dropped)."""
    t_init = category_table(self.model, self.tokenizer, self.config, category)
    return dataclasses.replace(self, category=category, t_init=t_init, bank=None, bank_meta=None)

  def with_bank(self, bank: reference.Bank | None, meta: dict | None = None) -> "Engine":
    """The same model scoring with `bank` fused in (None: zero-shot only)."""
    return dataclasses.replace(self, bank=bank, bank_meta=meta)

  def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float [H, W, 3] in [0, 1] -> (CLIP input [Sc, Sc, 3], DINOv3 input [Sd, Sd, 3]), normalised."""
    return tuple(normalize(resize_image(image, v.size), v.mean, v.std) for v in self.views)

  def forward(self, semantic_images: np.ndarray, structural_images: np.ndarray, owner: np.ndarray | None = None
              ) -> dict[str, np.ndarray]:
    """A batch through `evaluate.eval_step`: {"map": [B, S, S], "score", "s_global", "s_local": [B]}.

    With a bank, "map" and "score" are the fused ones (reference.fuse), "bank_score" the bank's alone,
    and `owner` [B] (bank image index or -1) scores a bank's own references leave-one-out.
    """
    b = semantic_images.shape[0]
    t_init = jnp.broadcast_to(self.t_init, (b,) + self.t_init.shape)  # [B, P, E]
    if self.bank is None:
      amap, sg, sl, sf = self._eval_step(semantic_images, structural_images, t_init, size=self.map_size, sigma=self.sigma)
      return {"map": np.asarray(amap), "score": np.asarray(sf), "s_global": np.asarray(sg),
              "s_local": np.asarray(sl)}
    owner = np.full(b, -1, np.int32) if owner is None else np.asarray(owner, np.int32)
    (amap, sg, sl, sf), ((bmap, bscore),), _ = self._bank_step(
        semantic_images, structural_images, t_init, (self.bank,), owner, spec=reference.spec(self.config),
        size=self.map_size, sigma=self.sigma)
    w = float(reference.settings(self.config).weight)
    return {"map": np.asarray(reference.fuse(amap, bmap, w)), "score": np.asarray(reference.fuse(sf, bscore, w)),
            "s_global": np.asarray(sg), "s_local": np.asarray(sl), "bank_score": np.asarray(bscore)}


def checkpoint_step(workdir: str) -> int | None:
  """The latest checkpoint step in `workdir` (None without checkpoints)."""
  mgr = checkpoint.manager(workdir)
  try:
    return mgr.latest_step()
  finally:
    mgr.close()


def category_table(model: SSVP, tokenizer, config: ml_collections.ConfigDict, category: str) -> jax.Array:
  """T_init [P, E] of one category through the frozen text tower (the words follow config.class_words)."""
  templates = templates_for(model, tokenizer, [category], config)
  table = functional.Bound(SSVP.prompt_table, model)((templates.ids, templates.eot))
  return table[0]


def load_engine(workdir: str, category: str = DEFAULT_CATEGORY,
                config: ml_collections.ConfigDict | None = None, use_reference: bool = True) -> Engine:
  """The trained model of `workdir` (its saved config unless `config` is given) for `category`, with the
  category's stored reference bank (`reference.bank_path`, written by calibrate) when `use_reference`."""
  config = config if config is not None else evaluate.load_config(workdir)
  model, tokenizer = evaluate.load_trained(config, workdir)
  if config.eval.score_norm != "none":
    log.warning("config.eval.score_norm=%r is transductive (per-class min-max over a test set); single images "
                "are scored with S_final of Eq. 19 instead (D15 'none')", config.eval.score_norm)
  log.info("category %r: prompts say %r", category, class_words(category, config.class_words))
  engine = Engine(model, config, category, category_table(model, tokenizer, config, category), views(config),
                  checkpoint_step(workdir), tokenizer)
  return with_stored_bank(engine, workdir) if use_reference else engine


def with_stored_bank(engine: Engine, workdir: str) -> Engine:
  """`engine` with its category's reference bank stored in `workdir` (unchanged when there is none)."""
  path = reference.bank_path(workdir, engine.category)
  if not os.path.isfile(path):
    return engine
  bank, meta = reference.load_bank(path, reference.fingerprint(engine.model, engine.config))
  log.info("using the reference bank %s (%d good images, fusion weight %g)", path, meta["num_references"],
           reference.settings(engine.config).weight)
  return engine.with_bank(bank, {**meta, "path": path})


# ------------------------------------------------------------------------------------------------
# Files -> scores
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Scored:
  """The result for one file: scores and map, or the reason it failed (`error`)."""
  path: str
  error: str | None = None
  height: int = 0                    # the upright image's size in pixels
  width: int = 0
  score: float = math.nan            # S_final (Eq. 19), or fused with the bank (reference.fuse)
  bank_score: float = math.nan       # the reference bank's score alone (NaN without a bank)
  s_global: float = math.nan
  s_local: float = math.nan
  map: np.ndarray | None = None      # [S, S] at the model's resolution (S = config.backbones.semantic.image_size)
  image: np.ndarray | None = None    # [h, w, 3] in [0, 1] at overlay size (only with keep_image)
  seconds: float = 0.0               # decoding + this image's share of its batch's forward pass


def overlay_shape(height: int, width: int, map_size: int) -> tuple[int, int]:
  """(h, w) of an overlay: the image's aspect ratio, longer side clamped to [map_size, OVERLAY_MAX_SIDE]."""
  longer = max(height, width)
  target = min(max(longer, map_size), max(OVERLAY_MAX_SIDE, map_size))
  scale = target / longer
  return max(1, round(height * scale)), max(1, round(width * scale))


def overlay_image(image: np.ndarray, map_size: int) -> np.ndarray:
  """float [H, W, 3] -> the overlay's background [h, w, 3] (`overlay_shape`), bicubic, in [0, 1]."""
  return np.clip(resize_hw(image, *overlay_shape(*image.shape[:2], map_size), Image.Resampling.BICUBIC), 0, 1)


def resize_hw(array: np.ndarray, height: int, width: int, resample: Image.Resampling) -> np.ndarray:
  """float [H, W] or [H, W, C] -> [height, width(, C)] with PIL's float resampling, channel by channel."""
  if array.shape[:2] == (height, width):
    return array.astype(np.float32, copy=True)
  if array.ndim == 2:
    return np.asarray(Image.fromarray(np.ascontiguousarray(array, np.float32)).resize((width, height), resample))
  return np.stack([resize_hw(array[:, :, c], height, width, resample) for c in range(array.shape[2])], axis=2)


def read_file(path: str) -> tuple[np.ndarray | None, str | None]:
  """(float [H, W, 3] in [0, 1], None), or (None, the reason naming the file) when it cannot be decoded."""
  try:
    return load_image(path, upright=True), None  # D22: a user's photo, EXIF orientation applied
  except DatasetError as e:
    return None, str(e)
  except (OSError, ValueError) as e:  # permissions, odd pixel layouts PIL decodes but cannot convert
    return None, f"{path}: cannot read ({type(e).__name__}: {e})"


def _load(engine: Engine, path: str, keep_image: bool):
  """Decodes and preprocesses one file (runs in a worker thread)."""
  t0 = time.perf_counter()
  image, error = read_file(path)  # [H, W, 3]
  if error:
    return path, error, None, time.perf_counter() - t0
  h, w = image.shape[:2]
  semantic, structural = engine.preprocess(image)
  small = None
  if keep_image:
    small = overlay_image(image, engine.map_size)
  return path, None, (semantic, structural, h, w, small), time.perf_counter() - t0


def _loaded_batches(engine: Engine, paths: Sequence[str], batch_size: int, workers: int, keep_image: bool):
  """Yields (start, loaded) per batch of `paths`: `_load` results, decoded on `workers` threads one batch
  ahead of the caller."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  starts = range(0, len(paths), batch_size)
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:

    def submit(start: int) -> list[concurrent.futures.Future]:
      return [pool.submit(_load, engine, p, keep_image) for p in paths[start:start + batch_size]]

    pending = submit(0)
    for start in starts:
      loaded = [f.result() for f in pending]
      pending = submit(start + batch_size)  # the next batch decodes while this one runs
      yield start, loaded


def _padded(engine: Engine, loaded, ok: list[int], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """The decoded rows `ok` of a batch as (semantic, structural) arrays of `batch_size` rows (padding rows zero)."""
  sc, sd = (v.size for v in engine.views)
  semantic = np.zeros((batch_size, sc, sc, 3), np.float32)  # padding rows stay zero; their outputs are dropped
  structural = np.zeros((batch_size, sd, sd, 3), np.float32)
  for row, i in enumerate(ok):
    semantic[row], structural[row] = loaded[i][2][0], loaded[i][2][1]
  return semantic, structural


def score_files(engine: Engine, paths: Sequence[str], batch_size: int = 8, workers: int = 4,
                keep_image: bool = False, owners: Sequence[int] | None = None) -> Iterator[Scored]:
  """Scores `paths` in batches of `batch_size` (the last one padded, so one compiled shape serves all).

  Yields one `Scored` per path, in order; decoding runs on `workers` threads, one batch ahead of
  the model. Files that fail to decode come back with `error` set. `owners` (one per path): each
  file's image index in the engine's bank, scored leave-one-out (see `Engine.forward`).
  """
  for start, loaded in _loaded_batches(engine, paths, batch_size, workers, keep_image):
    yield from _run_batch(engine, loaded, batch_size, None if owners is None else owners[start:start + batch_size])


def _run_batch(engine: Engine, loaded, batch_size: int, owners: Sequence[int] | None) -> list[Scored]:
  ok = [i for i, (_, err, _, _) in enumerate(loaded) if err is None]
  out = [Scored(path, error=err, seconds=sec) for path, err, _, sec in loaded]
  if not ok:
    return out
  semantic, structural = _padded(engine, loaded, ok, batch_size)
  owner = np.full(batch_size, -1, np.int32)
  if owners is not None:
    owner[:len(ok)] = [owners[i] for i in ok]
  t0 = time.perf_counter()
  res = engine.forward(semantic, structural, owner if engine.bank is not None else None)
  share = (time.perf_counter() - t0) / len(ok)
  for row, i in enumerate(ok):
    _, _, h, w, small = loaded[i][2]
    r = out[i]
    r.height, r.width, r.image = h, w, small
    r.score, r.s_global, r.s_local = (float(res[k][row]) for k in ("score", "s_global", "s_local"))
    r.bank_score = float(res["bank_score"][row]) if "bank_score" in res else math.nan
    r.map = res["map"][row]
    r.seconds += share
  return out


def bank_from_files(engine: Engine, paths: Sequence[str], batch_size: int = 8, workers: int = 4
                    ) -> tuple[reference.Bank | None, list[str], list[str]]:
  """(bank, used paths, errors): the reference bank of the good image files that decode (None when none do);
  the files are decoded and preprocessed exactly as `score_files` does."""
  spec = reference.spec(engine.config)
  run = functional.Bound(reference.selected_features, engine.model)
  parts, used, errors = [], [], []
  for _, loaded in _loaded_batches(engine, paths, batch_size, workers, False):
    ok = [i for i, (_, err, _, _) in enumerate(loaded) if err is None]
    errors += [err for _, err, _, _ in loaded if err is not None]
    if ok:
      out = run(*_padded(engine, loaded, ok, batch_size), spec=spec)
      parts.append([np.asarray(x)[:len(ok)] for x in out])
      used += [loaded[i][0] for i in ok]
  if not parts:
    return None, used, errors
  layers = tuple(np.concatenate(p) for p in zip(*parts))
  return reference.build_bank(layers, spec, reference.settings(engine.config).coreset), used, errors


def max_location(amap: np.ndarray, height: int, width: int) -> tuple[int, int]:
  """(x, y) pixel of the original image under the map's maximum ([S, S] map spans the whole image)."""
  s_h, s_w = amap.shape
  r, c = np.unravel_index(int(np.argmax(amap)), amap.shape)
  return min(width - 1, int((c + 0.5) * width / s_w)), min(height - 1, int((r + 0.5) * height / s_h))


# ------------------------------------------------------------------------------------------------
# Shared command-line pieces
# ------------------------------------------------------------------------------------------------

def define_flags() -> None:
  """--category, --batch_size, --workers for the predict and calibrate entry points (call once, in main)."""
  flags.DEFINE_string("category", DEFAULT_CATEGORY, "Category word(s) for the prompts, e.g. 'bottle'. Default "
                      "'object' (class-agnostic); passed through config.class_words like a dataset's "
                      "category names.")
  flags.DEFINE_integer("batch_size", None, "Images per forward pass (default: config.eval.batch_size).")
  flags.DEFINE_integer("workers", 4, "Decoding threads.")
  flags.DEFINE_integer("max_pixels", DEFAULT_MAX_PIXELS, "Largest image (width x height) to decode; larger files "
                       "are reported and skipped (about 16 bytes of memory per pixel).")


def expand_images(patterns: Sequence[str]) -> list[str]:
  """Files named by `patterns`: a file, a folder (its image files, recursively) or a glob (every match).

  A glob keeps every file it matches, image or not, so that a file that cannot be decoded is reported
  rather than silently passed over; a folder lists only files with an image extension.
  """
  out: list[str] = []
  for pattern in patterns:
    if os.path.isdir(pattern):
      for root, dirs, files in os.walk(pattern):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [os.path.join(root, f) for f in sorted(files) if is_image(f)]
    elif os.path.isfile(pattern):
      out.append(pattern)
    else:
      out += sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
  unique: dict[str, None] = {}  # first occurrence wins, order kept
  for p in out:
    unique.setdefault(os.path.abspath(p), None)
  return list(unique)
