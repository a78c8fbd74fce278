"""The measurement behind config.reference.weight: few-shot rows for several fusion weights, one pass.

    PYTHONPATH=. .venv/bin/python bench/fusion_weight.py --workdir=runs/demo --shots=4

Reads a trained work directory (its config.json and latest checkpoint), scores every eval_data
category once per seed (ssvp_jax/fewshot.py: score_category), then fuses the stored maps and scores
with each weight; prints mean I-AUROC / P-AUROC / PRO (percent) per weight, mean over seeds.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--shots", type=int, default=4)
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--weights", default="0,0.25,0.5,0.75,0.8,0.9,0.95,1")
  args = p.parse_args(argv)

  import numpy as np

  from ssvp_jax import evaluate, fewshot, functional
  from ssvp_jax.data import splits
  from ssvp_jax.models.prompts import templates_for
  from ssvp_jax.models.ssvp import SSVP

  config = evaluate.load_config(args.workdir)
  model, tokenizer = evaluate.load_trained(config, args.workdir)
  weights = [float(w) for w in args.weights.split(",")]
  rows: dict[str, list[dict]] = {}
  for key, ds in config.eval_data.items():
    test = splits.read_split(ds, args.workdir, f"eval_data.{key}")
    normals = fewshot.normal_training_records(ds, args.workdir, f"eval_data.{key}")
    cats = sorted({r.category for r in test})
    t = templates_for(model, tokenizer, cats, config)
    table = np.asarray(functional.Bound(SSVP.prompt_table, model)((t.ids, t.eot)))
    for c, cat in enumerate(cats):
      refs = [fewshot.draw_references([r for r in normals if r.category == cat], args.shots, s, cat)
              for s in range(args.seeds)]
      pred = fewshot.score_category(model, config, [r for r in test if r.category == cat], refs, table[c], cat)
      for w in weights:
        rows.setdefault(f"fused w={w:g}", []).append(fewshot.category_rows(pred, w)["fused"])
  print(f"{args.shots}-shot, {args.seeds} seeds, mean over categories (percent): I-AUROC / P-AUROC / PRO")
  for name, entries in rows.items():
    vals = [100 * np.mean([e[k] for e in entries]) for k in ("image_auroc", "pixel_auroc", "pixel_aupro")]
    print(f"{name:<14} " + " / ".join(f"{v:.1f}" for v in vals))


if __name__ == "__main__":
  main()
