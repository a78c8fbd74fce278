"""TFDS builders: tiny MVTec-AD and VisA trees -> ArrayRecord -> `tfds.data_source`, without TensorFlow."""

import csv
import os
import re
import sys

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from ssvp_jax.data import tfds_builders  # noqa: E402  (registers mvtec_ad and visa)
from ssvp_jax.data.common import DatasetError  # noqa: E402
from ssvp_jax.data.datasets import DATASETS, read_dataset  # noqa: E402

_RNG = np.random.default_rng(0)
MVTEC = DATASETS["mvtec"].categories
VISA = DATASETS["visa"].categories


def _rgb(h: int, w: int) -> np.ndarray:
  return _RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path: str, image: Image.Image) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path)


def _blob_mask(h: int, w: int, value: int) -> np.ndarray:
  m = np.zeros((h, w), np.uint8)
  m[3:9, 4:11] = value
  m[10:12, 2:5] = value + 1 if value < 255 else value  # VisA: a second region value
  return m


def make_mvtec(root: str, categories=MVTEC) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """MVTec layout, 16x16 px; returns {file_name: (expected image [H,W,3], expected mask [H,W])}.

  bottle has two train images and two defect types; grid is grayscale; capsule's normal test
  image is RGBA (re-encoded, alpha dropped); cable's mask is a palette PNG (re-encoded 0/255).
  """
  expected = {}

  def image(rel: str, mode: str = "RGB") -> np.ndarray:
    rgb = _rgb(16, 16)
    if mode == "L":
      _save(os.path.join(root, rel), Image.fromarray(rgb[..., 0]))
      rgb = np.repeat(rgb[..., :1], 3, axis=2)
    elif mode == "RGBA":
      _save(os.path.join(root, rel), Image.fromarray(np.dstack([rgb, _rgb(16, 16)[..., :1]])))
    else:
      _save(os.path.join(root, rel), Image.fromarray(rgb))
    return rgb

  for cat in categories:
    mode = "L" if cat == "grid" else "RGB"
    goods = ["train/good/000.png"] + (["train/good/001.png"] if cat == "bottle" else [])
    goods.append("test/good/000.png")
    for rel in goods:
      m = "RGBA" if (cat == "capsule" and rel.startswith("test")) else mode
      expected[f"{cat}/{rel}"] = (image(f"{cat}/{rel}", m), np.zeros((16, 16), np.uint8))
    for defect in ["broken_large", "contamination"] if cat == "bottle" else ["crack"]:
      rel = f"{cat}/test/{defect}/000.png"
      mask = _blob_mask(16, 16, 255)
      mask_path = os.path.join(root, cat, "ground_truth", defect, "000_mask.png")
      if cat == "cable":
        pal = Image.fromarray((mask > 0).astype(np.uint8), mode="P")
        pal.putpalette([0, 0, 0, 200, 30, 30])
        _save(mask_path, pal)
      else:
        _save(mask_path, Image.fromarray(mask))
      expected[rel] = (image(rel, mode), mask)
  return expected


def make_visa(root: str, categories=VISA) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """VisA layout with split_csv/1cls.csv, 16x24 px JPEGs, masks with values 1 and 2."""
  expected = {}
  rows = []
  for cat in categories:
    for name, split in [("0000", "train"), ("0001", "test")]:
      rel = f"{cat}/Data/Images/Normal/{name}.JPG"
      _save(os.path.join(root, rel), Image.fromarray(_rgb(16, 24)))
      rows.append([cat, split, "normal", rel, ""])
      expected[rel] = (None, np.zeros((16, 24), np.uint8))
    rel, mrel = f"{cat}/Data/Images/Anomaly/000.JPG", f"{cat}/Data/Masks/Anomaly/000.png"
    _save(os.path.join(root, rel), Image.fromarray(_rgb(16, 24)))
    mask = _blob_mask(16, 24, 1)
    _save(os.path.join(root, mrel), Image.fromarray(mask))
    rows.append([cat, "test", "anomaly", rel, mrel])
    expected[rel] = (None, mask)
  os.makedirs(os.path.join(root, "split_csv"))
  with open(os.path.join(root, "split_csv", "1cls.csv"), "w", newline="") as f:
    csv.writer(f).writerows([["object", "split", "label", "image", "mask"]] + rows)
  # JPEG is lossy: the stored bytes are the file's own, so they decode to the file's pixels.
  out = {}
  for k, (_, m) in expected.items():
    with Image.open(os.path.join(root, k)) as im:
      out[k] = (np.asarray(im.convert("RGB")), m)
  return out


def _is_tf(name: str) -> bool:
  return name == "tensorflow" or name.startswith("tensorflow.")


class _HideTensorFlow:
  """Wraps a meta-path finder so that it does not find TensorFlow, as on a machine without it."""

  def __init__(self, finder):
    self._finder = finder

  def find_spec(self, name, path=None, target=None):
    if _is_tf(name) or not hasattr(self._finder, "find_spec"):
      return None
    return self._finder.find_spec(name, path, target)


@pytest.fixture
def no_tensorflow(monkeypatch):
  """TensorFlow cannot be found or imported during the test, even where it is installed.

  (Raising from a finder would not do: etils probes `importlib.util.find_spec("tensorflow")`
  and expects None; a None entry in sys.modules reads as "TF is loaded".)
  """
  assert not any(_is_tf(m) for m in sys.modules), "TF imported before the test: cannot check"
  monkeypatch.setattr(sys, "meta_path", [_HideTensorFlow(f) for f in sys.meta_path])
  yield
  assert not any(_is_tf(m) for m in sys.modules), "the build or the read imported TensorFlow"
  with pytest.raises(ImportError):
    import tensorflow  # noqa: F401


def _build(name: str, manual_dir: str, data_dir: str) -> None:
  builder = tfds.builder(name, data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))


def _check(name: str, reader: str, root: str, data_dir: str, expected: dict, categories,
           counts: dict[str, int]) -> None:
  """Every example read back equals its source file and sits at its reader's index."""
  sources = tfds.data_source(name, data_dir=data_dir, download=False)
  assert set(sources) == {"train", "test"}
  features = tfds.builder(name, data_dir=data_dir).info.features
  for split, source in sources.items():
    records = read_dataset(reader, root, split, categories)
    assert len(source) == len(records) == counts[split]
    for i, record in enumerate(records):
      ex = source[i]
      file_name = ex["file_name"].decode()
      assert file_name == os.path.relpath(record.image_path, root)
      image, mask = expected[file_name]
      np.testing.assert_array_equal(ex["image"], image, err_msg=file_name)
      np.testing.assert_array_equal(ex["mask"][..., 0], mask, err_msg=file_name)
      assert ex["label"] == record.label == int(mask.any())
      assert features["label"].int2str(ex["label"]) == ("anomalous" if record.label else "normal")
      assert features["category"].int2str(ex["category"]) == record.category
      assert ex["defect"].decode() == record.defect


def test_mvtec_all(tmp_path, no_tensorflow):
  root, data_dir = str(tmp_path / "mvtec"), str(tmp_path / "tfds")
  expected = make_mvtec(root)
  _build("mvtec_ad/all", root, data_dir)
  # 15 categories: train 1 good each (+1 bottle); test 1 good + 1 defect each (+1 bottle).
  _check("mvtec_ad/all", "mvtec", root, data_dir, expected, MVTEC, {"train": 16, "test": 31})
  # Two special cases really went through re-encoding: palette mask -> 0/255, RGBA -> RGB.
  test = tfds.data_source("mvtec_ad/all", split="test", data_dir=data_dir, download=False)
  names = [test[i]["file_name"].decode() for i in range(len(test))]
  assert set(np.unique(test[names.index("cable/test/crack/000.png")]["mask"])) == {0, 255}
  assert test[names.index("capsule/test/good/000.png")]["image"].shape == (16, 16, 3)


def test_visa_all(tmp_path, no_tensorflow):
  root, data_dir = str(tmp_path / "visa"), str(tmp_path / "tfds")
  expected = make_visa(root)
  _build("visa/all", root, data_dir)
  _check("visa/all", "visa", root, data_dir, expected, VISA, {"train": 12, "test": 24})
  test = tfds.data_source("visa/all", split="test", data_dir=data_dir, download=False)
  anomalous = [test[i] for i in range(len(test)) if test[i]["label"] == 1]
  assert len(anomalous) == 12
  for ex in anomalous:  # non-square, and VisA's mask values survive (not turned into 255)
    assert ex["image"].shape == (16, 24, 3) and set(np.unique(ex["mask"])) == {0, 1, 2}


def test_category_config_prepare_and_cli(tmp_path, capsys, no_tensorflow):
  root, data_dir = str(tmp_path / "mvtec"), str(tmp_path / "tfds")
  # A user who extracted two categories can build either one; `all` needs all 15 (below).
  expected = make_mvtec(root, categories=("bottle", "grid"))
  builder = tfds_builders.prepare("mvtec_ad", root, data_dir, config="bottle")
  assert builder.info.splits["train"].num_examples == 2
  # Reading needs only the prepared folder, not this project's builder classes.
  assert len(tfds.builder_from_directory(builder.data_dir).as_data_source("test")) == 3
  _check("mvtec_ad/bottle", "mvtec", root, data_dir, expected, ["bottle"], {"train": 2, "test": 3})
  # The module's command line (`tfds build` itself needs TensorFlow).
  argv = ["--dataset", "mvtec_ad", "--manual_dir", root, "--data_dir", data_dir, "--config", "grid"]
  assert tfds_builders.main(argv) == 0
  assert "train: 1 examples\ntest: 2 examples" in capsys.readouterr().out
  ex = tfds.data_source("mvtec_ad/grid", split="test", data_dir=data_dir, download=False)[0]
  # Category ids are shared by all configs, so per-category sets can be mixed.
  assert ex["category"] == MVTEC.index("grid")
  assert builder.info.features["category"].int2str(ex["category"]) == "grid"
  assert tfds_builders.main(argv[:-1] + ["all"]) == 1
  assert "error: manual_dir=" in capsys.readouterr().err
  with pytest.raises(DatasetError, match=r"manual_dir=.*mvtec .*\['cable', 'capsule'"):
    _build("mvtec_ad/all", root, data_dir)
  assert not os.path.exists(os.path.join(data_dir, "mvtec_ad", "all", "1.0.0"))


def test_wrong_manual_dir_names_it(tmp_path):
  data_dir = str(tmp_path / "tfds")
  missing = str(tmp_path / "no_such_dir")
  with pytest.raises(DatasetError, match=f"{re.escape(missing)}.*does not exist"):
    _build("visa/all", missing, data_dir)
  # A VisA root given to the MVTec builder, and a category folder given as the root.
  make_visa(str(tmp_path / "visa"), categories=("candle",))
  with pytest.raises(DatasetError, match=f"manual_dir={re.escape(str(tmp_path / 'visa'))} .*MVTec-AD"):
    _build("mvtec_ad/bottle", str(tmp_path / "visa"), data_dir)
  with pytest.raises(DatasetError, match=r"manual_dir=.*candle .*VisA.*1cls\.csv"):
    _build("visa/candle", str(tmp_path / "visa" / "candle"), data_dir)
  # Nothing half-written is left where a reader would pick it up.
  assert not os.path.exists(os.path.join(data_dir, "mvtec_ad", "bottle", "1.0.0"))


def test_mask_of_wrong_size_names_the_file(tmp_path):
  root = str(tmp_path / "mvtec")
  make_mvtec(root, categories=("bottle",))
  bad = os.path.join(root, "bottle", "ground_truth", "contamination", "000_mask.png")
  Image.fromarray(np.zeros((16, 12), np.uint8)).save(bad)
  with pytest.raises(DatasetError, match=f"{re.escape(bad)}: mask is 12x16 but its image .* is 16x16"):
    _build("mvtec_ad/bottle", root, str(tmp_path / "tfds"))
