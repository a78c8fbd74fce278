"""The web inspector in a real browser: Debian's headless Chromium, driven by selenium, uploads two images
and a non-image, reads the scores shown and checks them against predict; the threshold slider changes
decisions without rescoring; a reference bank built from two good images in the second tab is stored
and the scores shown then equal predict's with that bank. Set SSVP_APP_SCREENSHOT=path to keep a
screenshot."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from helpers.tiny import REPO, copy_workdir, target_records
from ssvp_jax import app, predict, reference
from ssvp_jax.errors import UserError

pytest.importorskip("gradio")
pytest.importorskip("selenium")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
  pytest.skip("Debian's chromium + chromium-driver are not installed (.ci/run installs them)",
              allow_module_level=True)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _browser():
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1300"):
    options.add_argument(a)
  return webdriver.Chrome(service=Service(DRIVER), options=options)


def _rows(browser):
  from selenium.webdriver.common.by import By
  return [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
          for tr in browser.find_elements(By.CSS_SELECTOR, "#results tbody tr")]


def test_app_in_headless_chromium_shows_predicts_scores(trained_workdir, engine, tmp_path):  # noqa: F811
  from selenium.webdriver.common.by import By
  from selenium.webdriver.common.keys import Keys
  from selenium.webdriver.support.ui import WebDriverWait
  records = [r for r in target_records(trained_workdir) if r.category == "dots"]
  good, *more_good = [r.image_path for r in records if not r.label]
  bad = next(r.image_path for r in records if r.label)
  images = [str(shutil.copy(good, tmp_path / "good.jpg")), str(shutil.copy(bad, tmp_path / "bad.jpg"))]
  (tmp_path / "notes.png").write_text("not an image")
  rows = predict.predict(engine.with_category("dots"), images, str(tmp_path / "pred"), batch_size=2)
  expected = {os.path.basename(r["path"]): float(r["score"]) for r in rows}
  middle = float(np.mean(list(expected.values())))

  workdir = copy_workdir(trained_workdir, str(tmp_path / "wd"))
  with open(os.path.join(workdir, "calibration.json"), "w") as f:
    json.dump({"image_threshold": 0.0, "pixel_threshold": 0.5, "category": "dots"}, f)
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", GRADIO_ANALYTICS_ENABLED="False")
  server = subprocess.Popen([sys.executable, "-m", "ssvp_jax.app", f"--workdir={workdir}", f"--port={port}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  browser = None
  try:
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 300
    while True:  # the server builds the model first
      try:
        urllib.request.urlopen(url, timeout=5)
        break
      except OSError:
        assert server.poll() is None, server.stdout.read()[-3000:]
        assert time.time() < deadline, "the app did not start in 300 s"
        time.sleep(1)
    browser = _browser()
    browser.get(url)
    wait = WebDriverWait(browser, 180)
    upload = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#upload input[type=file]"))
    upload.send_keys("\n".join(images + [str(tmp_path / "notes.png")]))
    wait.until(lambda b: "notes.png" in b.page_source)  # listed once the upload finished
    browser.find_element(By.CSS_SELECTOR, "#score").click()
    wait.until(lambda b: len(_rows(b)) == 3)
    shown = {r[0]: r for r in _rows(browser)}
    for name, score in expected.items():
      assert float(shown[name][1]) == pytest.approx(score, abs=2e-6), name  # printed with 6 decimals
      assert shown[name][2] == "defective"  # threshold 0 from calibration.json
    assert "notes.png: cannot decode image" in shown["notes.png"][3]
    assert "2 of 3 scored" in browser.find_element(By.CSS_SELECTOR, "#status").text

    box = browser.find_element(By.CSS_SELECTOR, "#threshold input[type=number]")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(f"{middle:.6f}", Keys.ENTER)
    wait.until(lambda b: f"{middle:.4f}" in b.find_element(By.CSS_SELECTOR, "#threshold-note").text)
    decided = {r[0]: r[2] for r in _rows(browser)}
    assert decided == {n: "defective" if s >= middle else "good" for n, s in expected.items()} | {"notes.png": ""}
    assert sorted(decided.values()) == ["", "defective", "good"]  # the slider split the two images
    if os.environ.get("SSVP_APP_SCREENSHOT"):
      browser.save_screenshot(os.environ["SSVP_APP_SCREENSHOT"])

    # the second tab: a reference bank from two other good images (and the text file, skipped visibly)
    browser.find_element(By.XPATH, "//button[@role='tab'][contains(., 'Reference bank')]").click()
    bank_upload = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#bank-upload input[type=file]"))
    bank_upload.send_keys("\n".join(more_good[:2] + [str(tmp_path / "notes.png")]))
    wait.until(lambda b: "notes.png" in b.find_element(By.CSS_SELECTOR, "#bank-upload").get_attribute("outerHTML"))
    browser.find_element(By.CSS_SELECTOR, "#build-bank").click()
    wait.until(lambda b: "Reference bank of 2" in b.find_element(By.CSS_SELECTOR, "#bank-status").text)
    assert "notes.png: cannot decode image" in browser.find_element(By.CSS_SELECTOR, "#bank-status").text
    path = reference.bank_path(workdir, "dots")
    bank, meta = reference.load_bank(path, reference.fingerprint(engine.model, engine.config))
    assert meta["num_references"] == 2
    banked = predict.predict(engine.with_category("dots").with_bank(bank, {**meta, "path": path}), images,
                             str(tmp_path / "pred_bank"), batch_size=2)
    browser.find_element(By.XPATH, "//button[@role='tab'][contains(., 'Score images')]").click()
    browser.find_element(By.CSS_SELECTOR, "#score").click()
    wait.until(lambda b: "reference bank of 2" in b.find_element(By.CSS_SELECTOR, "#status").text)
    heads = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#results thead th")]
    assert heads == ["file", "score", "decision", "bank_score", "error"]
    shown = {r[0]: r for r in _rows(browser)}
    for r in banked:
      name = os.path.basename(r["path"])
      assert float(shown[name][1]) == pytest.approx(float(r["score"]), abs=2e-6), name
      assert float(shown[name][3]) == pytest.approx(float(r["bank_score"]), abs=2e-6), name
      assert float(r["score"]) != pytest.approx(expected[name], abs=1e-6)  # the bank changed the score
  except Exception:
    server.terminate()
    print(server.communicate(timeout=30)[0][-3000:])  # the app's log
    if browser is not None:
      browser.save_screenshot(str(tmp_path / "failure.png"))
      print("screenshot of the failure:", tmp_path / "failure.png")
    raise
  finally:
    if browser is not None:
      browser.quit()
    server.terminate()
    server.wait(timeout=30)


def test_inspector_limits_and_csv(engine, tmp_path):  # noqa: F811
  from PIL import Image
  Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(tmp_path / "ok.png")
  (tmp_path / "big.png").write_bytes(b"0" * 2000)
  (tmp_path / "bad.png").write_text("not an image")
  inspector = app.Inspector(engine, image_threshold=None, pixel_threshold=None, max_bytes=1500)
  rows, gallery = inspector.score([str(tmp_path / "ok.png"), str(tmp_path / "big.png")], "")
  assert [r["file"] for r in rows] == ["big.png", "ok.png"] and len(gallery) == 1
  assert "above the upload limit" in rows[0]["error"] and rows[1]["error"] == ""
  assert "no threshold" in inspector.table(rows, None)
  csv_path = inspector.csv_file(rows, rows[1]["score"], str(tmp_path))
  lines = open(csv_path).read().splitlines()
  assert lines[0].startswith("file,score,decision") and lines[2].split(",")[2] == "defective"
  tiled, _ = inspector.score([str(tmp_path / "ok.png")], "dots", tile=20, overlap=4)
  assert tiled[0]["error"] == "" and np.isfinite(tiled[0]["score"])
  with pytest.raises(UserError, match="no work directory"):
    inspector.build_bank([str(tmp_path / "ok.png")] * 2, "dots")
  inspector.workdir = str(tmp_path)
  with pytest.raises(UserError, match=r"at least 2 readable good images, got 1 of 3(.|\n)*big.png(.|\n)*bad.png"):
    inspector.build_bank([str(tmp_path / p) for p in ("ok.png", "big.png", "bad.png")], "dots")
  assert not os.path.exists(reference.bank_path(str(tmp_path), "dots"))
  Image.fromarray(np.full((40, 30, 3), 9, np.uint8)).save(tmp_path / "ok2.png")
  note = inspector.build_bank([str(tmp_path / "ok.png"), str(tmp_path / "ok2.png")], "dots")
  assert "Reference bank of 2" in note and os.path.isfile(reference.bank_path(str(tmp_path), "dots"))
  assert "reference bank of 2" in inspector.bank_note("dots")
