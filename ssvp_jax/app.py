"""A web inspector for a trained work directory (Gradio; `pip install -e '.[app]'`).

    python -m ssvp_jax.app --workdir=runs/demo [--host=127.0.0.1 --port=7860]

Open the printed address, drop one or many images, choose the category word (default: the calibrated
one, else "object") and press Score. Each image shows its overlay on the reports' fixed colour scale
(0 blue .. 1 red, magenta contour at the pixel threshold), its score and its decision at the image
threshold of calibration.json. The threshold slider changes the decisions without scoring again;
"Download CSV" gives the rows of the table (the columns of predict's CSV that apply). With a tile
size, large images are scored as overlapping tiles (tiling.py) instead of one resize.

Binds to 127.0.0.1 unless --host says otherwise (there is no authentication). A file above --max_mb,
or one that is not an image, gets a visible error row; the others are scored.

The second tab builds the category word's reference bank (ssvp_jax/reference.py, docs/reference_bank.md)
from a few good images (at least 2 readable) with `calibrate.store_bank`, stored in the work directory
where calibrate puts it (replacing an older one of that word); from then on the first tab scores that
word fused with the bank (status line "scoring with a reference bank of K good images", a bank_score
column), as predict does with the stored bank. A bank loaded at start (calibrate's) is used likewise.
"""

from __future__ import annotations

import csv
import html
import io
import logging
import os
import tempfile
import time
from typing import Any, Sequence

import numpy as np

from ssvp_jax import calibrate, inference, predict, tiling
from ssvp_jax.errors import UserError

log = logging.getLogger("ssvp_jax")

CSV_COLUMNS = ("file", "score", "decision", "s_global", "s_local", "bank_score", "max_value", "seconds", "error")


class Inspector:
  """The app without its user interface: scores uploads and renders tables; Gradio only calls these."""

  def __init__(self, engine: inference.Engine, image_threshold: float | None, pixel_threshold: float | None,
               max_bytes: int, batch_size: int = 8, workdir: str | None = None):
    self.workdir = workdir  # where built reference banks are stored (None: the bank tab refuses)
    self.engines = {engine.category: engine}
    self.default_category = engine.category
    self.image_threshold, self.pixel_threshold = image_threshold, pixel_threshold
    self.max_bytes, self.batch_size = max_bytes, batch_size

  def engine(self, category: str) -> inference.Engine:
    word = (category or "").strip() or self.default_category
    if word not in self.engines:
      engine = self.engines[self.default_category].with_category(word)
      self.engines[word] = inference.with_stored_bank(engine, self.workdir) if self.workdir else engine
    return self.engines[word]

  def _accepted(self, paths: Sequence[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """(paths within the upload limit, an error row for each one above it)."""
    ok, rows = [], []
    for p in paths:
      name = os.path.basename(p)
      size = os.path.getsize(p) if os.path.isfile(p) else 0
      if size > self.max_bytes:
        rows.append(_error_row(name, f"{name}: {size / 1e6:.1f} MB is above the upload limit of "
                                     f"{self.max_bytes / 1e6:.0f} MB"))
      else:
        ok.append(p)
    return ok, rows

  def bank_note(self, category: str) -> str:
    """How `category` is scored: with its reference bank (of how many images) or zero-shot."""
    e = self.engine(category)
    if e.bank is None:
      return f"category {e.category!r} scored zero-shot (no reference bank)"
    return f"scoring with a reference bank of {e.bank_meta['num_references']} good images (category {e.category!r})"

  def build_bank(self, paths: Sequence[str], category: str) -> str:
    """Builds and stores the reference bank of `category` from good image files (`calibrate.store_bank`);
    later scores of that word are fused with it. Returns a Markdown message; raises UserError when
    fewer than 2 files are readable images (the stored bank, if any, is then left as it was)."""
    if self.workdir is None:
      raise UserError("this inspector has no work directory to store a reference bank in")
    ok, rows = self._accepted(paths)
    errors = [r["error"] for r in rows]
    readable = []
    for p in ok:
      _, err = inference.read_file(p)
      if err:
        errors.append(err.replace(p, os.path.basename(p)))
      else:
        readable.append(p)
    problems = "".join(f"\n- {html.escape(e)}" for e in errors)
    if len(readable) < 2:
      raise UserError(f"a reference bank needs at least 2 readable good images, got {len(readable)} of "
                      f"{len(paths)}; no bank built{problems}")
    zero_shot = self.engine(category).with_bank(None)
    engine, _ = calibrate.store_bank(zero_shot, self.workdir, readable, self.batch_size, workers=2)
    if engine.bank is None:  # store_bank found fewer than 2 usable images after all
      self.engines[zero_shot.category] = zero_shot
      raise UserError(f"no reference bank: fewer than 2 of {len(readable)} images could be used{problems}")
    self.engines[engine.category] = engine
    skipped = f"; {len(errors)} file(s) skipped:{problems}" if errors else ""
    return (f"Reference bank of {len(readable)} good images built for category {engine.category!r} and stored in "
            f"`{engine.bank_meta['path']}`; the Score tab now scores this word with it (the thresholds of "
            f"calibration.json were not set with this bank: rerun calibrate){skipped}")

  def score(self, paths: Sequence[str], category: str, tile: int = 0, overlap: int = 0
            ) -> tuple[list[dict[str, Any]], list[tuple[np.ndarray, str]]]:
    """(one row per file, [(overlay uint8 [h, w, 3], caption)] for the scored ones). Never raises for a file."""
    gallery: list[tuple[np.ndarray, str]] = []
    ok, rows = self._accepted(paths)
    if tile:
      tiling.check_args(tile, overlap)
      results = tiling.score_files(self.engine(category), ok, tile, overlap, self.batch_size, keep_image=True)
    else:
      results = inference.score_files(self.engine(category), ok, self.batch_size, workers=2, keep_image=True)
    for r in results:
      name = os.path.basename(r.path)
      if r.error:
        rows.append(_error_row(name, r.error.replace(r.path, name)))
        continue
      rows.append({"file": name, "score": r.score, "s_global": r.s_global, "s_local": r.s_local,
                   "bank_score": r.bank_score, "max_value": float(r.map.max()), "seconds": r.seconds, "error": ""})
      gallery.append((predict.overlay(r, self.pixel_threshold), f"{name}: {r.score:.4f}"))
    return rows, gallery

  def table(self, rows: Sequence[dict[str, Any]], threshold: float | None) -> str:
    """The results as an HTML table (id "results"), decisions at `threshold`; a bank_score column (before
    the error column) when a reference bank scored the images."""
    banked = any(np.isfinite(r.get("bank_score", np.nan)) for r in rows)
    head = "".join(f"<th>{c}</th>" for c in ("file", "score", "decision") + ("bank_score",) * banked + ("error",))
    body = []
    for r in rows:
      err = html.escape(r["error"])
      score = "" if r["error"] else f"{r['score']:.6f}"
      bank = f"<td class='bank_score'>{'' if r['error'] else format(r['bank_score'], '.6f')}</td>" if banked else ""
      body.append(f"<tr class='{'error' if err else 'scored'}'><td>{html.escape(r['file'])}</td>"
                  f"<td class='score'>{score}</td><td class='decision'>{decision(r, threshold)}</td>{bank}"
                  f"<td class='error' style='color:#c00'>{err}</td></tr>")
    thr = "no threshold (run ssvp_jax.calibrate)" if threshold is None else f"threshold {threshold:.4f}"
    return (f"<p id='threshold-note'>Decisions at {thr}.</p><table id='results'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")

  def csv_file(self, rows: Sequence[dict[str, Any]], threshold: float | None, folder: str) -> str:
    """Writes the rows as predictions.csv in `folder`; returns its path."""
    path = os.path.join(folder, "predictions.csv")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
      writer.writerow({**{c: r.get(c, "") for c in CSV_COLUMNS}, "decision": decision(r, threshold)})
    with open(path, "w", newline="") as f:
      f.write(buf.getvalue())
    return path


def decision(row: dict[str, Any], threshold: float | None) -> str:
  if row["error"] or threshold is None:
    return ""
  return "defective" if row["score"] >= threshold else "good"


def _error_row(name: str, error: str) -> dict[str, Any]:
  return {"file": name, "score": float("nan"), "s_global": float("nan"), "s_local": float("nan"),
          "bank_score": float("nan"), "max_value": float("nan"), "seconds": 0.0, "error": error}


def build_ui(inspector: Inspector):
  """The Gradio Blocks of the inspector."""
  import gradio as gr

  with gr.Blocks(title="SSVP inspector") as ui:
    gr.Markdown("## SSVP anomaly inspector\nDrop images, choose the category word, press **Score**. "
                "Colours: 0 blue .. 1 red (the reports' fixed scale); magenta: the pixel threshold.")
    category = gr.Textbox(label="Category word (both tabs)", value=inspector.default_category, elem_id="category")
    with gr.Tab("Score images"):
      with gr.Row():
        files = gr.File(label="Images", file_count="multiple", elem_id="upload")
        with gr.Column():
          with gr.Row():
            tile = gr.Number(label="Tile (px, 0 = whole image)", value=0, precision=0, minimum=0, elem_id="tile")
            overlap = gr.Number(label="Overlap (px)", value=0, precision=0, minimum=0, elem_id="overlap")
          button = gr.Button("Score", variant="primary", elem_id="score")
      status = gr.Markdown(elem_id="status")
      slider = gr.Slider(0.0, 1.0, value=inspector.image_threshold if inspector.image_threshold is not None
                         else 0.5, step=0.0001, label="Image threshold (decisions only; no rescoring)",
                         elem_id="threshold")
      table = gr.HTML(elem_id="table")
      gallery = gr.Gallery(label="Overlays", columns=4, height=320, elem_id="gallery")
      download = gr.File(label="Download CSV", elem_id="csv")
      rows_state = gr.State([])
    with gr.Tab("Reference bank (few-shot)"):
      gr.Markdown("Drop a few **good** images of the category (at least 2) and press **Build bank**: the "
                  "category word's reference bank is stored in the work directory (replacing an older one), "
                  "and the Score tab then fuses its scores with it (docs/reference_bank.md).")
      bank_files = gr.File(label="Good images", file_count="multiple", elem_id="bank-upload")
      bank_button = gr.Button("Build bank", variant="primary", elem_id="build-bank")
      bank_status = gr.Markdown(elem_id="bank-status")

    folder = tempfile.mkdtemp(prefix="ssvp_app_")

    def on_score(uploaded, word, tile_px, overlap_px, threshold):
      paths = [f if isinstance(f, str) else f.name for f in (uploaded or [])]
      if not paths:
        return [], "", [], None, "**Add one or more images first.**"
      t0 = time.perf_counter()
      try:
        rows, shown = inspector.score(paths, word, int(tile_px or 0), int(overlap_px or 0))
      except Exception as e:  # noqa: BLE001  (the page must show any failure, never die)
        log.exception("scoring failed")
        return [], "", [], None, f"**Error:** {html.escape(str(e))}"
      failed = sum(bool(r["error"]) for r in rows)
      note = f"{len(rows) - failed} of {len(rows)} scored in {time.perf_counter() - t0:.1f} s" + (
          f"; **{failed} failed** (see the table)" if failed else "") + f"; {inspector.bank_note(word)}"
      return rows, inspector.table(rows, threshold), shown, inspector.csv_file(rows, threshold, folder), note

    def on_bank(uploaded, word):
      paths = [f if isinstance(f, str) else f.name for f in (uploaded or [])]
      try:
        return inspector.build_bank(paths, word)
      except UserError as e:  # its message is Markdown with the file names escaped
        return f"**Error:** {e}"
      except Exception as e:  # noqa: BLE001  (the page must show any failure, never die)
        log.exception("building the reference bank failed")
        return f"**Error:** {html.escape(str(e))}"

    def on_threshold(rows, threshold):
      if not rows:
        return "", None
      return inspector.table(rows, threshold), inspector.csv_file(rows, threshold, folder)

    button.click(on_score, [files, category, tile, overlap, slider], [rows_state, table, gallery, download, status])
    bank_button.click(on_bank, [bank_files, category], [bank_status])
    slider.change(on_threshold, [rows_state, slider], [table, download])
  return ui


def main(argv) -> int:
  del argv
  from ssvp_jax.calibrate import load_calibration
  from ssvp_jax.cli import FLAGS, setup
  setup()
  cal = load_calibration(FLAGS.workdir) or {}
  category = FLAGS.category if FLAGS["category"].present or not cal else cal.get("category", FLAGS.category)
  engine = inference.load_engine(FLAGS.workdir, category, FLAGS.config)
  if cal.get("checkpoint_step") not in (None, engine.step):
    log.warning("calibration.json was made with the checkpoint of step %s, the model is at step %s: recalibrate",
                cal.get("checkpoint_step"), engine.step)
  inspector = Inspector(engine, cal.get("image_threshold"), cal.get("pixel_threshold"),
                        int(FLAGS.max_mb * 1e6), FLAGS.batch_size or engine.config.eval.batch_size, FLAGS.workdir)
  ui = build_ui(inspector)
  print(f"SSVP inspector on http://{FLAGS.host}:{FLAGS.port} (category {category!r})", flush=True)
  ui.queue().launch(server_name=FLAGS.host, server_port=FLAGS.port, share=False, inbrowser=False,
                    show_error=True, allowed_paths=[])
  return 0


if __name__ == "__main__":
  from absl import app, flags

  import ssvp_jax.cli  # noqa: F401  (--config, --workdir)
  flags.DEFINE_string("category", inference.DEFAULT_CATEGORY, "Default category word (default: the calibrated one).")
  flags.DEFINE_string("host", "127.0.0.1", "Address to bind; 0.0.0.0 exposes the app to the network.")
  flags.DEFINE_integer("port", 7860, "Port.")
  flags.DEFINE_float("max_mb", 20.0, "Largest upload per file, in MB.")
  flags.DEFINE_integer("batch_size", None, "Images per forward pass (default: config.eval.batch_size).")
  app.run(main)
