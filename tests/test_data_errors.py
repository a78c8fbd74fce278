"""Bad input: each problem raises a DatasetError naming the file, or (user folders) logs a skip."""

import csv
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from ssvp_jax.data import common, pipeline
from ssvp_jax.data.common import DatasetError
from ssvp_jax.data.datasets import read_dataset


def _img(path, hw=(6, 8), mode="RGB"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new(mode, hw[::-1], 90).save(path)
  return str(path)


def _garbage(path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(b"this is not an image")
  return str(path)


def _mvtec(tmp_path):
  root = tmp_path / "mvtec"
  _img(root / "bottle" / "test" / "good" / "000.png")
  _img(root / "bottle" / "test" / "crack" / "000.png")
  _img(root / "bottle" / "ground_truth" / "crack" / "000_mask.png", mode="L")
  return root


def test_missing_mask_names_the_image(tmp_path):
  root = _mvtec(tmp_path)
  orphan = _img(root / "bottle" / "test" / "crack" / "001.png")
  with pytest.raises(DatasetError, match="anomalous image has no mask") as e:
    read_dataset("mvtec", str(root))
  assert orphan in str(e.value) and "001_mask" in str(e.value)


def test_mask_size_mismatch_at_verify_and_at_load(tmp_path):
  root = _mvtec(tmp_path)
  bad = _img(root / "bottle" / "ground_truth" / "crack" / "000_mask.png", hw=(5, 8), mode="L")
  recs = read_dataset("mvtec", str(root))  # header checks are opt-in at read time ...
  with pytest.raises(DatasetError, match="mask is 8x5 but its image") as e:
    read_dataset("mvtec", str(root), verify=True)
  assert bad in str(e.value)
  with pytest.raises(DatasetError, match="mask is 8x5") as e:  # ... and always done when loading
    pipeline.load_example(recs[0], [pipeline.View("x", 4, (0, 0, 0), (1, 1, 1))], 4)
  assert bad in str(e.value)


def test_unreadable_image(tmp_path):
  root = _mvtec(tmp_path)
  bad = _garbage(root / "bottle" / "test" / "good" / "001.png")
  with pytest.raises(DatasetError, match="cannot read image") as e:
    read_dataset("mvtec", str(root), verify=True)
  assert bad in str(e.value)
  with pytest.raises(DatasetError, match="cannot decode image") as e:
    pipeline.load_image(bad)
  assert bad in str(e.value)
  truncated = str(root / "cut.png")
  with open(root / "bottle" / "test" / "good" / "000.png", "rb") as f:
    data = f.read()
  with open(truncated, "wb") as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(DatasetError, match="cannot decode image") as e:
    pipeline.load_mask(truncated)
  assert truncated in str(e.value)


def test_empty_category(tmp_path):
  root = _mvtec(tmp_path)
  os.makedirs(root / "cable" / "test" / "good")
  with pytest.raises(DatasetError, match="category 'cable' has no images") as e:
    read_dataset("mvtec", str(root))
  assert os.path.join("cable", "test") in str(e.value)


@pytest.mark.parametrize("name, message", [
    ("mvtec", "not a MVTec-AD layout"), ("visa", "not a VisA root"), ("btad", "not a BTAD layout"),
    ("dagm", "not a DAGM 2007 root"), ("rsdd", "not an RSDD root"), ("ksdd2", "folder not found"),
    ("folder", "not a folder dataset"), ("meta", "meta.json not found")])
def test_root_of_another_layout(tmp_path, name, message):
  root = tmp_path / "somewhere"
  _img(root / "readme" / "x.png")  # a folder with an image, in no known layout
  with pytest.raises(DatasetError, match=message) as e:
    read_dataset(name, str(root))
  assert str(root) in str(e.value)


def test_missing_root_categories_split_and_name(tmp_path):
  root = _mvtec(tmp_path)
  with pytest.raises(DatasetError, match="folder not found"):
    read_dataset("mvtec", str(tmp_path / "nope"))
  with pytest.raises(DatasetError, match=r"categories \['pill'\] not found"):
    read_dataset("mvtec", str(root), categories=["pill"])
  with pytest.raises(DatasetError, match="has no 'train' split"):
    read_dataset("rsdd", str(root), "train")
  with pytest.raises(ValueError, match="unknown dataset 'mvtech'"):
    read_dataset("mvtech", str(root))


def test_visa_csv_problems(tmp_path):
  root = tmp_path / "visa"
  img = _img(root / "candle" / "Data" / "Images" / "Anomaly" / "000.JPG")
  _img(root / "candle" / "Data" / "Masks" / "Anomaly" / "001.png", mode="L")
  os.makedirs(root / "split_csv")

  def write(mask):
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
      csv.writer(f).writerows([["object", "split", "label", "image", "mask"],
                               ["candle", "test", "anomaly", "candle/Data/Images/Anomaly/000.JPG", mask]])

  write("candle/Data/Masks/Anomaly/000.png")
  with pytest.raises(DatasetError, match="mask listed in .* line 2 not found"):
    read_dataset("visa", str(root))
  write("candle/Data/Masks/Anomaly/001.png")
  with pytest.raises(DatasetError, match="does not share the stem"):
    read_dataset("visa", str(root))
  write("")
  with pytest.raises(DatasetError, match="anomalous image has no mask") as e:
    read_dataset("visa", str(root))
  assert img in str(e.value)


def test_meta_missing_file(tmp_path):
  root = tmp_path / "m"
  os.makedirs(root)
  with open(root / "meta.json", "w") as f:
    json.dump({"train": {}, "test": {"c": [{"img_path": "c/x.png", "mask_path": "", "cls_name": "c",
                                            "specie_name": "good", "anomaly": 0}]}}, f)
  with pytest.raises(DatasetError, match="listed in .*meta.json .test/c row 0. but not found") as e:
    read_dataset("meta", str(root))
  assert os.path.join(str(root), "c/x.png") in str(e.value)


def test_user_folder_logs_each_skip(tmp_path, caplog):
  root = tmp_path / "mine"
  _img(root / "part" / "good" / "ok.png")
  bad_img = _garbage(root / "part" / "good" / "broken.png")
  _img(root / "part" / "dent" / "fine.png")
  _img(root / "part" / "masks" / "dent" / "fine.png", mode="L")
  no_mask = _img(root / "part" / "dent" / "nomask.png")
  wrong = _img(root / "part" / "dent" / "wrong.png")
  _img(root / "part" / "masks" / "dent" / "wrong.png", hw=(3, 3), mode="L")
  os.makedirs(root / "empty" / "good")
  with caplog.at_level(logging.WARNING, logger="ssvp_jax.data.folder"):
    recs = read_dataset("folder", str(root))
  assert sorted(os.path.basename(r.image_path) for r in recs) == ["fine.png", "ok.png"]
  text = caplog.text
  assert bad_img in text and "cannot read image" in text
  assert no_mask in text and "has no mask" in text
  assert wrong in text and "mask is 3x3" in text
  assert "skipping category empty" in text
  assert len(caplog.records) == 4


def test_pipeline_rejects_transposed_mask_with_hint(tmp_path):
  img = str(tmp_path / "rot.jpg")
  exif = Image.Exif()
  exif[0x0112] = 6  # stored 8x6, shown 6x8
  Image.new("RGB", (8, 6), 50).save(img, exif=exif)
  from ssvp_jax.data.records import Record
  view = [pipeline.View("x", 4, (0,) * 3, (1,) * 3)]
  # D22: a dataset image is read as stored, so its mask (stored size, no tag) matches.
  ok = _img(tmp_path / "ok.png", hw=(6, 8), mode="L")
  assert pipeline.load_example(Record(img, ok, "c", "d", 1, "test"), view, 4)["mask"].shape == (4, 4)
  assert common.image_size(img) == (6, 8)
  bad = _img(tmp_path / "m.png", hw=(8, 6), mode="L")
  with pytest.raises(DatasetError, match=r"transposed\?"):
    pipeline.load_example(Record(img, bad, "c", "d", 1, "test"), view, 4)
  assert np.array_equal(pipeline.load_image(img).shape, (6, 8, 3))
  assert np.array_equal(pipeline.load_image(img, upright=True).shape, (8, 6, 3))
