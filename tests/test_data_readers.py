"""Dataset readers on tiny trees written in each publisher's layout, meta.json round trips, make_meta."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from ssvp_jax.data import make_meta, meta
from ssvp_jax.data.datasets import DATASETS, read_dataset
from ssvp_jax.data.pipeline import load_image, load_mask
from ssvp_jax.data.records import Record


def _img(path, hw=(6, 8), mode="RGB", value=128, fmt=None):
  """Writes a small constant image (or mask when `value` is an array)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  a = np.asarray(value, np.uint8)
  if a.ndim == 0:
    a = np.full(hw + ((3,) if mode == "RGB" else ()), a, np.uint8)
  Image.fromarray(a).convert(mode).save(path, format=fmt)
  return str(path)


def _mask(path, hw=(6, 8), value=255, fmt=None):
  m = np.zeros(hw, np.uint8)
  m[1:3, 2:5] = value
  return _img(path, hw, "L", m, fmt)


@pytest.fixture
def mvtec_root(tmp_path):
  root = tmp_path / "mvtec"
  for cat, mode in (("bottle", "RGB"), ("grid", "L")):  # grid ships as grayscale
    for split, defect, stems in (("train", "good", ["000", "001"]), ("test", "good", ["000"]),
                                 ("test", "crack", ["a", "a_b"]), ("test", "cut", ["000"])):
      for s in stems:
        _img(root / cat / split / defect / f"{s}.png", mode=mode)
        if defect != "good":
          _mask(root / cat / "ground_truth" / defect / f"{s}_mask.png")
  return str(root)


def test_mvtec_pairs_by_stem_not_position(mvtec_root):
  recs = read_dataset("mvtec", mvtec_root, "test")
  assert [r.category for r in recs] == ["bottle"] * 4 + ["grid"] * 4
  bottle = {os.path.basename(r.image_path): r for r in recs if r.category == "bottle" and r.defect == "crack"}
  # Sorted listings disagree here: a.png < a_b.png but a_b_mask.png < a_mask.png.
  assert os.path.basename(bottle["a.png"].mask_path) == "a_mask.png"
  assert os.path.basename(bottle["a_b.png"].mask_path) == "a_b_mask.png"
  good = [r for r in recs if r.defect == "good"]
  assert all(r.mask_path is None and r.label == 0 for r in good)
  assert all(r.label == 1 and r.split == "test" for r in recs if r.defect != "good")
  train = read_dataset("mvtec", mvtec_root, "train", categories=["grid"])
  assert len(train) == 2 and all(r.label == 0 and r.split == "train" for r in train)
  # The grayscale category decodes to three equal channels.
  gray = load_image(train[0].image_path)
  assert gray.shape == (6, 8, 3) and np.allclose(gray[..., 0], gray[..., 2])


def test_dtd_and_mpdd_share_the_mvtec_reader(tmp_path):
  root = tmp_path / "dtd"
  _img(root / "Woven_001" / "test" / "good" / "000.png")
  _img(root / "Woven_001" / "test" / "bad" / "000.png")
  _mask(root / "Woven_001" / "ground_truth" / "bad" / "000_mask.png")
  recs = read_dataset("dtd", str(root))
  assert [(r.defect, r.label) for r in recs] == [("bad", 1), ("good", 0)]
  assert "Woven_001" in DATASETS["dtd"].categories and len(DATASETS["mpdd"].categories) == 6


def _visa_tree(tmp_path):
  root = tmp_path / "visa"
  rows = [["object", "split", "label", "image", "mask"]]
  for cat in ("candle", "pcb1"):
    for i, split in enumerate(["train", "train", "test"]):
      rel = f"{cat}/Data/Images/Normal/{i:04d}.JPG"
      _img(root / rel, hw=(6, 10), fmt="JPEG")
      rows.append([cat, split, "normal", rel, ""])
    for i, value in enumerate([1, 2]):  # VisA masks hold small integers, not 255
      rel, mrel = f"{cat}/Data/Images/Anomaly/{i:03d}.JPG", f"{cat}/Data/Masks/Anomaly/{i:03d}.png"
      _img(root / rel, hw=(6, 10), fmt="JPEG")
      _mask(root / mrel, hw=(6, 10), value=value)
      rows.append([cat, "test", "anomaly", rel, mrel])
  os.makedirs(root / "split_csv")
  with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
    csv.writer(f).writerows(rows)
  return str(root)


def test_visa_reads_split_csv_and_small_mask_values(tmp_path):
  root = _visa_tree(tmp_path)
  test = read_dataset("visa", root, "test")
  assert [(r.category, r.label) for r in test] == [("candle", 0), ("candle", 1), ("candle", 1),
                                                   ("pcb1", 0), ("pcb1", 1), ("pcb1", 1)]
  for r in test:
    if r.label:
      assert os.path.basename(r.mask_path)[:3] == os.path.basename(r.image_path)[:3]
      m = load_mask(r.mask_path)
      assert m.sum() == 6 and m[1:3, 2:5].all()  # values 1 and 2 both count as anomalous
  train = read_dataset("visa", root, "train", categories=["pcb1"])
  assert len(train) == 2 and {r.split for r in train} == {"train"}


def test_btad_file_quirks(tmp_path):
  root = tmp_path / "btad"
  # 01: .bmp images, <stem>.png masks; 02: .png, <stem>.png; 03: .bmp, masks with the image's own name.
  for cat, ext, mext in (("01", ".bmp", ".png"), ("02", ".png", ".png"), ("03", ".bmp", ".bmp")):
    _img(root / cat / "train" / "ok" / f"0000{ext}")
    _img(root / cat / "test" / "ok" / f"0000{ext}")
    for s in ("0000", "0001"):
      _img(root / cat / "test" / "ko" / f"{s}{ext}")
      _mask(root / cat / "ground_truth" / "ko" / f"{s}{mext}")
  recs = read_dataset("btad", str(root))
  assert len(recs) == 9 and [r.category for r in recs[::3]] == ["01", "02", "03"]
  for r in recs:
    if r.label:
      assert r.defect == "ko" and os.path.splitext(os.path.basename(r.mask_path))[0] == \
          os.path.splitext(os.path.basename(r.image_path))[0]
      assert load_mask(r.mask_path).sum() == 6
    else:
      assert r.defect == "good" and r.mask_path is None
  assert [r.mask_path.endswith(".bmp") for r in recs if r.label] == [False] * 4 + [True] * 2


def test_ksdd2_labels_from_gt_content(tmp_path):
  root = tmp_path / "ksdd2"
  for split in ("train", "test"):
    _img(root / split / "10000.png")
    _mask(root / split / "10000_GT.png", value=0)  # negatives ship an all-zero mask
    _img(root / split / "10001.png")
    _mask(root / split / "10001_GT.png")
  recs = read_dataset("ksdd2", str(root), "test")
  assert [(os.path.basename(r.image_path), r.label, r.mask_path is None) for r in recs] == [
      ("10000.png", 0, True), ("10001.png", 1, False)]
  assert recs[1].mask_path.endswith("10001_GT.png") and recs[0].category == "ksdd2"
  assert len(read_dataset("ksdd2", str(root), "train")) == 2


def test_rsdd_release_and_pos_neg_forms(tmp_path):
  root = tmp_path / "rsdd"
  base = root / "Type-I RSDDs dataset"
  _img(base / "Rail surface images" / "rail_1.jpg", hw=(20, 6), fmt="JPEG")
  _mask(base / "GroundTruth" / "rail_1.jpg", hw=(20, 6), fmt="JPEG")
  _img(base / "Rail surface images" / "rail_2.jpg", hw=(20, 6), fmt="JPEG")
  _mask(base / "GroundTruth" / "rail_2.jpg", hw=(20, 6), value=0, fmt="JPEG")
  _img(root / "pos" / "I-metal-defect-000001.jpg", fmt="JPEG")
  _mask(root / "pos" / "I-metal-defect-000001.png")
  _img(root / "neg" / "I-metal-null-000001.jpg", fmt="JPEG")
  _mask(root / "neg" / "I-metal-null-000001.png", value=0)
  recs = read_dataset("rsdd", str(root))
  assert [(r.category, os.path.basename(r.image_path), r.label) for r in recs] == [
      ("rail_type1", "rail_1.jpg", 1), ("rail_type1", "rail_2.jpg", 0),
      ("rail", "I-metal-defect-000001.jpg", 1), ("rail", "I-metal-null-000001.jpg", 0)]
  assert recs[0].mask_path.endswith(os.path.join("GroundTruth", "rail_1.jpg")) and recs[1].mask_path is None
  assert recs[2].mask_path.endswith("I-metal-defect-000001.png")
  assert load_mask(recs[0].mask_path).sum() == 6  # JPEG mask: thresholded at 127, edges' noise ignored


def test_dagm_labels_from_label_files(tmp_path):
  root = tmp_path / "dagm"
  for cat in ("Class1", "Class10", "Class2"):
    for split in ("Train", "Test"):
      _img(root / cat / split / "0001.PNG", mode="L", fmt="PNG")
      _img(root / cat / split / "0002.PNG", mode="L", fmt="PNG")
      _mask(root / cat / split / "Label" / "0002_label.PNG", fmt="PNG")
  recs = read_dataset("dagm", str(root), "test")
  assert [r.category for r in recs[::2]] == ["Class1", "Class2", "Class10"]  # numeric order
  assert [(os.path.basename(r.image_path), r.label) for r in recs[:2]] == [("0001.PNG", 0), ("0002.PNG", 1)]
  assert recs[1].mask_path.endswith(os.path.join("Test", "Label", "0002_label.PNG"))
  assert {r.split for r in read_dataset("dagm", str(root), "train")} == {"train"}


def test_folder_single_and_multi_category(tmp_path):
  one = tmp_path / "widget"
  _img(one / "good" / "a.png")
  _img(one / "dent" / "b.png")
  _mask(one / "masks" / "dent" / "b.png")
  _img(one / "scratch" / "c.png")
  _mask(one / "masks" / "c_mask.png")
  recs = read_dataset("folder", str(one))
  assert [(r.category, r.defect, r.label) for r in recs] == [
      ("widget", "dent", 1), ("widget", "good", 0), ("widget", "scratch", 1)]
  assert recs[0].mask_path.endswith(os.path.join("masks", "dent", "b.png"))
  assert recs[2].mask_path.endswith("c_mask.png")
  many = tmp_path / "many"
  _img(many / "bolt" / "good" / "a.png")
  _img(many / "bolt" / "crack" / "b.png")  # no masks/ at all: image-level only
  _img(many / "nut" / "good" / "a.png")
  recs = read_dataset("folder", str(many))
  assert [(r.category, r.label, r.mask_path) for r in recs] == [("bolt", 1, None), ("bolt", 0, None),
                                                               ("nut", 0, None)]


def test_meta_round_trip_equals_reader(mvtec_root, tmp_path):
  by_split, path = make_meta.make_meta("mvtec", mvtec_root)
  assert path == os.path.join(mvtec_root, "meta.json")
  for split in ("train", "test"):
    assert read_dataset("meta", mvtec_root, split) == by_split[split] == read_dataset("mvtec", mvtec_root, split)
  visa = _visa_tree(tmp_path)
  make_meta.make_meta("visa", visa)
  assert read_dataset("meta", visa) == read_dataset("visa", visa)


def test_make_meta_format_and_counts(mvtec_root, capsys):
  assert make_meta.main(["--dataset", "mvtec", "--root", mvtec_root]) == 0
  out = capsys.readouterr().out
  assert "bottle" in out and "wrote" in out
  line = next(l for l in out.splitlines() if l.startswith("grid"))
  assert line.split()[1:] == ["2", "1", "3"]  # train, test normal, test anomalous
  with open(os.path.join(mvtec_root, "meta.json")) as f:
    text = f.read()
  info = json.loads(text)
  assert text == json.dumps(info, indent=4) + "\n"  # the lineage's formatting
  assert list(info) == ["train", "test"] and list(info["test"]) == ["bottle", "grid"]
  rows = info["test"]["bottle"]
  assert rows[0] == {"img_path": "bottle/test/crack/a.png", "mask_path": "bottle/ground_truth/crack/a_mask.png",
                     "cls_name": "bottle", "specie_name": "crack", "anomaly": 1}
  good = [r for r in rows if r["anomaly"] == 0]
  assert good == [{"img_path": "bottle/test/good/000.png", "mask_path": "", "cls_name": "bottle",
                   "specie_name": "good", "anomaly": 0}]
  assert sum(len(v) for v in info["test"].values()) == 8 and sum(len(v) for v in info["train"].values()) == 4


def test_meta_reads_lineage_variants(tmp_path):
  # Bayes-PFL: paths start with the root folder's own name, a placeholder row for an empty
  # train split, an extra dataset_name key; AnomalyCLIP's DAGM script: "Test" key, empty specie_name.
  root = tmp_path / "RSDD"
  img = _img(root / "Metal" / "test" / "anomaly" / "x.bmp")
  mask = _mask(root / "Metal" / "ground_truth" / "anomaly" / "x.png")
  _img(root / "Metal" / "test" / "good" / "y.bmp")
  info = {"Train": {"Metal": [{"img_path": "", "mask_path": "", "cls_name": "Metal", "specie_name": "good",
                               "dataset_name": "", "anomaly": 0}]},
          "Test": {"Metal": [
              {"img_path": "RSDD/Metal/test/anomaly/x.bmp", "mask_path": "RSDD/Metal/ground_truth/anomaly/x.png",
               "cls_name": "Metal", "specie_name": "", "dataset_name": "RSDD", "anomaly": 1},
              {"img_path": "Metal/test/good/y.bmp", "mask_path": "", "cls_name": "Metal", "specie_name": "ok",
               "anomaly": 0}]}}
  with open(root / "meta.json", "w") as f:
    json.dump(info, f)
  recs = read_dataset("meta", str(root))
  assert recs == [Record(img, mask, "Metal", "anomaly", 1, "test"),
                  Record(str(root / "Metal" / "test" / "good" / "y.bmp"), None, "Metal", "good", 0, "test")]
  with pytest.raises(meta.DatasetError, match="has no images"):
    read_dataset("meta", str(root), "train")  # only a placeholder row


def test_bayes_pfl_protocol_dagm_ksdd2_rsdd(tmp_path):
  """Bayes-PFL's protocol: DAGM classes 1-5, 7, 8 only; per class every defective image and only the
  first N normal ones by name (N = defective count) for DAGM, KSDD2 and RSDD's pos/neg form; "full"
  keeps everything. make_meta writes the same records."""
  dagm = tmp_path / "dagm"
  for i in range(1, 11):
    for stem in ("0001", "0002", "0003", "0004"):
      _img(dagm / f"Class{i}" / "Test" / f"{stem}.PNG", mode="L", fmt="PNG")
    _mask(dagm / f"Class{i}" / "Test" / "Label" / "0003_label.PNG", fmt="PNG")
  full = read_dataset("dagm", str(dagm), "test")
  assert len(full) == 40 and len({r.category for r in full}) == 10
  paper = read_dataset("dagm", str(dagm), "test", protocol="bayes_pfl")
  assert sorted({r.category for r in paper}, key=lambda c: int(c[5:])) == [f"Class{i}" for i in (1, 2, 3, 4, 5, 7, 8)]
  for cat in {r.category for r in paper}:
    rows = [(os.path.basename(r.image_path), r.label) for r in paper if r.category == cat]
    assert rows == [("0001.PNG", 0), ("0003.PNG", 1)]  # one defective, so the first normal only
  # Explicit categories override the protocol's class list (the image cap still applies).
  assert {r.category for r in read_dataset("dagm", str(dagm), "test", ["Class6"], protocol="bayes_pfl")} == {"Class6"}
  by_split, path = make_meta.make_meta("dagm", str(dagm), splits=["test"], protocol="bayes_pfl")
  assert read_dataset("meta", str(dagm), "test") == by_split["test"] == paper

  ksdd2 = tmp_path / "ksdd2"
  for k, positive in enumerate([0, 1, 0, 0, 1, 0]):
    _img(ksdd2 / "test" / f"{10000 + k}.png")
    _mask(ksdd2 / "test" / f"{10000 + k}_GT.png", value=255 if positive else 0)
  assert len(read_dataset("ksdd2", str(ksdd2), "test")) == 6
  capped = read_dataset("ksdd2", str(ksdd2), "test", protocol="bayes_pfl")
  assert [(os.path.basename(r.image_path), r.label) for r in capped] == [
      ("10000.png", 0), ("10001.png", 1), ("10002.png", 0), ("10004.png", 1)]

  rsdd = tmp_path / "rsdd"
  _img(rsdd / "pos" / "a.jpg", fmt="JPEG")
  _mask(rsdd / "pos" / "a.png")
  for s in ("n1", "n2", "n3"):
    _img(rsdd / "neg" / f"{s}.jpg", fmt="JPEG")
  assert [os.path.basename(r.image_path) for r in read_dataset("rsdd", str(rsdd), protocol="bayes_pfl")] == [
      "a.jpg", "n1.jpg"]
  with pytest.raises(ValueError, match="protocol must be one of"):
    read_dataset("rsdd", str(rsdd), protocol="paper")


def test_bayes_pfl_protocol_keeps_btad_and_mvtec_whole(mvtec_root):
  assert read_dataset("mvtec", mvtec_root, "test", protocol="bayes_pfl") == read_dataset("mvtec", mvtec_root, "test")
