"""TFDS builders for MVTec-AD and VisA, built from the user's own copy (optional `tfds` extra).

Importing this module registers two datasets with TensorFlow Datasets:

    mvtec_ad/<config>   configs: all (default), bottle, cable, ..., zipper
    visa/<config>       configs: all (default), candle, capsules, ..., pipe_fryum

Nothing is downloaded: `manual_dir` is the root of the extracted release (the folder that
holds `bottle/`, ... for MVTec-AD; `split_csv/` and `candle/`, ... for VisA). Examples are
enumerated by the project's own readers (`ssvp_jax.data.datasets.read_dataset`), so the
TFDS copy holds exactly the records the evaluation code sees, in the same order: index i
of a split is the i-th record of `read_dataset(name, root, split, categories)`.

Each example:

    image      uint8 [H, W, 3]  the source file's bytes when it is 8-bit RGB or grayscale
                                PNG/JPEG (grayscale decodes to 3 equal channels), else
                                re-encoded as PNG from `pipeline.load_image`
    mask       uint8 [H, W, 1]  the source mask's values when it is an 8-bit single-channel
                                PNG (MVTec 0/255, VisA 0/1/2...), else 0/255 from
                                `pipeline.load_mask`; all zero for normal images.
                                A pixel is anomalous when mask > 0.
    label      ClassLabel       normal / anomalous
    category   ClassLabel       the dataset's category names (same ids in every config)
    defect     Text             MVTec: the defect folder; VisA: "anomaly"; "good" when normal
    file_name  Text             image path relative to manual_dir, e.g. "bottle/test/good/000.png"

Files are written as ArrayRecord and read back with `tfds.data_source(...)`, which needs
no TensorFlow. `as_dataset()` needs TensorFlow and reads TFRecord files only; so does the
`tfds build` command line, hence this module's own:

    python -m ssvp_jax.data.tfds_builders --dataset mvtec_ad \\
        --manual_dir /data/mvtec_anomaly_detection --data_dir ~/tensorflow_datasets
    python -m ssvp_jax.data.tfds_builders --dataset visa --config candle \\
        --manual_dir /data/VisA_20220922 --data_dir ~/tensorflow_datasets
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import os
import sys
from typing import ClassVar, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from ssvp_jax.data import datasets, pipeline
from ssvp_jax.data.common import LOSSY_EXTS, DatasetError
from ssvp_jax.data.records import Record

SPLITS = ("train", "test")
LABEL_NAMES = ("normal", "anomalous")
_EXIF_ORIENTATION = 0x0112
# Formats every TFDS image decoder reads (PIL, OpenCV, tf.image.decode_image): kept as bytes.
_PASSTHROUGH_FORMATS = ("PNG", "JPEG")


@dataclasses.dataclass(eq=False)
class CategoryConfig(tfds.core.BuilderConfig):
  """A builder config: which categories the dataset holds (`all` or one category)."""
  categories: tuple[str, ...] = ()


def category_configs(categories: tuple[str, ...], dataset: str) -> list[CategoryConfig]:
  """`all` (the default, every category) followed by one config per category."""
  configs = [CategoryConfig(name="all", categories=categories,
                            description=f"All {len(categories)} categories of {dataset}.")]
  configs += [CategoryConfig(name=c, categories=(c,), description=f"{dataset}, category {c} only.")
              for c in categories]
  return configs


def _probe(path: str) -> tuple[str, str | None, int, tuple[int, int]]:
  """(mode, format, EXIF orientation, (height, width) as stored) from the header only."""
  try:
    with Image.open(path) as im:
      return im.mode, im.format, im.getexif().get(_EXIF_ORIENTATION, 1), (im.height, im.width)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise DatasetError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


def _png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


@functools.lru_cache(maxsize=64)
def _zero_mask_png(height: int, width: int) -> bytes:
  """The mask of a normal image; one encoding per image size (sizes repeat within a category)."""
  return _png(np.zeros((height, width), np.uint8))


def encode_image(path: str) -> tuple[bytes, tuple[int, int]]:
  """Encoded image for the `image` feature and its (height, width), pixels as stored (D22).

  8-bit RGB or grayscale PNG/JPEG without EXIF rotation is stored as the file's own bytes
  (no re-compression of JPEGs); anything else goes through `pipeline.load_image`, so TFDS
  readers see the same pixels as the project's pipeline, stored as lossless PNG.
  """
  mode, fmt, orientation, hw = _probe(path)
  if mode in ("RGB", "L") and fmt in _PASSTHROUGH_FORMATS and orientation == 1:
    with open(path, "rb") as f:
      return f.read(), hw
  rgb = np.round(pipeline.load_image(path) * 255.0).astype(np.uint8)  # [H, W, 3]
  return _png(rgb), rgb.shape[:2]


def encode_mask(path: str | None, image_hw: tuple[int, int], image_path: str) -> bytes:
  """Encoded single-channel mask for the `mask` feature; all zero when `path` is None.

  An 8-bit single-channel PNG keeps its values (MVTec 0/255, VisA's small integers); other
  masks (palette, colour, lossy, 16-bit, rotated) become 0/255 by `pipeline.load_mask`'s
  rule. Raises DatasetError naming the mask when its size differs from the image's.
  """
  if path is None:
    return _zero_mask_png(*image_hw)
  mode, fmt, orientation, hw = _probe(path)
  if orientation in (5, 6, 7, 8):  # EXIF rotation by 90 degrees swaps height and width
    hw = hw[::-1]
  if hw != image_hw:
    raise DatasetError(f"{path}: mask is {hw[1]}x{hw[0]} but its image {image_path} is "
                       f"{image_hw[1]}x{image_hw[0]} (width x height)")
  if (mode == "L" and fmt == "PNG" and orientation == 1
      and not path.lower().endswith(LOSSY_EXTS)):
    with open(path, "rb") as f:
      return f.read()
  return _png(pipeline.load_mask(path).astype(np.uint8) * 255)  # [H, W]


def make_example(record: Record, root: str) -> dict[str, object]:
  """The feature dict of one record; `root` is the dataset root that `file_name` is relative to."""
  image, hw = encode_image(record.image_path)
  return {
      "image": image,
      "mask": encode_mask(record.mask_path, hw, record.image_path),
      "label": LABEL_NAMES[record.label],
      "category": record.category,
      "defect": record.defect,
      "file_name": os.path.relpath(record.image_path, root).replace(os.sep, "/"),
  }


class _AnomalyBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared body of the MVTec-AD and VisA builders (not registered itself)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: manual_dir build, image, mask, label, category, defect."}

  READER: ClassVar[str]  # the name `datasets.read_dataset` knows the layout by
  TITLE: ClassVar[str]
  CATEGORIES: ClassVar[tuple[str, ...]]
  HOMEPAGE: ClassVar[str]
  CITATION: ClassVar[str]

  def __init__(self, *, file_format: str | None = None, **kwargs):
    # TFDS defaults to TFRecord, which only TensorFlow can write; ArrayRecord needs no TF and
    # gives the random access that `tfds.data_source` and grain use.
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
        "mask": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8),
        "label": tfds.features.ClassLabel(names=list(LABEL_NAMES)),
        "category": tfds.features.ClassLabel(names=list(self.CATEGORIES)),
        "defect": tfds.features.Text(),
        "file_name": tfds.features.Text(),
    })
    # `dataset_info_from_configs` would look for README/CITATIONS files next to this module.
    return tfds.core.DatasetInfo(
        builder=self,
        description=(f"{self.TITLE} industrial anomaly detection, built from a local copy. "
                     "mask > 0 marks anomalous pixels; normal images have an all-zero mask."),
        features=features,
        homepage=self.HOMEPAGE,
        citation=self.CITATION,
        # Keep the readers' order (category, then file) so split index i == record i.
        disable_shuffling=True,
    )

  def _root(self, dl_manager: tfds.download.DownloadManager) -> str:
    try:
      return os.fspath(dl_manager.manual_dir)
    except AssertionError as e:  # TFDS's "does not exist or is empty", with the path
      raise DatasetError(f"{self.TITLE} manual_dir: {e}") from e

  def _read(self, root: str, split: str) -> list[Record]:
    try:
      return datasets.read_dataset(self.READER, root, split=split,
                                   categories=list(self.builder_config.categories))
    except DatasetError as e:
      raise DatasetError(f"manual_dir={root} is not a usable extracted {self.TITLE} root "
                         f"for config '{self.builder_config.name}': {e}") from e

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
    root = self._root(dl_manager)
    # Read both splits before writing anything, so a broken tree fails in seconds.
    records = {split: self._read(root, split) for split in SPLITS}
    return {split: self._generate_examples(recs, root) for split, recs in records.items()}

  def _generate_examples(self, records: list[Record], root: str) -> Iterator[tuple[int, dict]]:
    # Integer keys: with shuffling disabled TFDS writes examples sorted by key.
    for i, record in enumerate(records):
      yield i, make_example(record, root)


class MvtecAd(_AnomalyBuilder):
  """MVTec-AD (15 categories; train: normal only, test: normal + anomalous with masks)."""

  READER = "mvtec"
  TITLE = "MVTec-AD"
  CATEGORIES = datasets.DATASETS[READER].categories
  BUILDER_CONFIGS = category_configs(CATEGORIES, TITLE)
  HOMEPAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
  CITATION = """@inproceedings{bergmann2019mvtec,
  title={MVTec AD -- A Comprehensive Real-World Dataset for Unsupervised Anomaly Detection},
  author={Bergmann, Paul and Fauser, Michael and Sattlegger, David and Steger, Carsten},
  booktitle={CVPR}, year={2019}}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download MVTec-AD from https://www.mvtec.com/company/research/datasets/mvtec-ad (licence:
  CC BY-NC-SA 4.0), extract it, and pass the extracted root (the folder holding bottle/,
  cable/, ..., zipper/) as manual_dir. Config `all` needs all 15 categories; a per-category
  config needs only its own folder."""


class Visa(_AnomalyBuilder):
  """VisA (12 categories) with the official `split_csv/1cls.csv` split."""

  READER = "visa"
  TITLE = "VisA"
  CATEGORIES = datasets.DATASETS[READER].categories
  BUILDER_CONFIGS = category_configs(CATEGORIES, TITLE)
  HOMEPAGE = "https://github.com/amazon-science/spot-diff"
  CITATION = """@inproceedings{zou2022spot,
  title={SPot-the-Difference Self-Supervised Pre-training for Anomaly Detection and Segmentation},
  author={Zou, Yang and Jeong, Jongheon and Pemula, Latha and Zhang, Dongqing and Dabeer, Onkar},
  booktitle={ECCV}, year={2022}}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download VisA_20220922.tar from https://github.com/amazon-science/spot-diff (licence:
  CC BY 4.0), extract it, and pass the extracted root (the folder holding candle/, ...,
  pipe_fryum/ and split_csv/1cls.csv) as manual_dir."""


def prepare(name: str, manual_dir: str, data_dir: str, config: str = "all") -> tfds.core.DatasetBuilder:
  """Builds `name/config` ("mvtec_ad" or "visa") from `manual_dir` into `data_dir`; returns the builder.

  A no-op when the dataset is already in `data_dir`. Read it back with
  `tfds.data_source(f"{name}/{config}", data_dir=data_dir, download=False)`.
  """
  builder = tfds.builder(f"{name}/{config}", data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", required=True, choices=["mvtec_ad", "visa"])
  p.add_argument("--manual_dir", required=True, help="root of the extracted release on your disk")
  p.add_argument("--data_dir", required=True, help="where TFDS writes the prepared dataset")
  p.add_argument("--config", default="all", help="'all' (default) or one category name")
  args = p.parse_args(argv)
  try:
    builder = prepare(args.dataset, args.manual_dir, args.data_dir, args.config)
  except DatasetError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for split, info in builder.info.splits.items():
    print(f"{split}: {info.num_examples} examples")
  print(f"wrote {builder.data_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
