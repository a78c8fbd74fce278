"""Ablation of the fidelity pass (issue 11, SPEC section 6 "rev." rows and D17-D20) on the demo.

    .venv/bin/python bench/ablation.py --out runs/ablation            # every variant, 3-15 min each
    .venv/bin/python bench/ablation.py --out runs/ablation --only after before
    .venv/bin/python bench/ablation.py --out runs/ablation_lr3 --flags="--config.optim.lr=1e-3"

Each variant trains and evaluates `configs/demo.py` in its own work directory under `--out`
(one shared copy of the demo data), then `--out`/ablation.md gets one row per variant: the
held-out zero-shot means (I-AUROC / P-AUROC / PRO, percent) and the wall time of the run.
"before" sets every revised decision back to its earlier default, "after" is the config as it
is, and each "no_Dn" row reverts one decision alone. A variant whose results.json exists is not
run again (delete its folder to rerun). The demo's backbones are random: a decision that hurts
here may still be right with real weights (SPEC section 6 keeps the lineage's choice).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each earlier default, as a config override (SPEC section 6, "alternative" column).
REVERT = {
    "D3": ["--config.hsvs.normalize_clip=False"],
    "D7": ["--config.vtam.learn_tau=False"],
    "D8": ["--config.vcpg.latent_tokens=1"],
    "D9": ["--config.vtam.top_k=0"],
    "D11": ["--config.loss.seg_form=mean"],
    "D17": ["--config.loss.supervise_fused=False"],
    "D18": ["--config.vcpg.stop_grad_input=False"],
    "D19": ["--config.vcpg.rec_reduction=mean"],
    "D20": ["--config.loss.direct_logits=False"],
}
VARIANTS = {"after": [], "before": [x for v in REVERT.values() for x in v]}
VARIANTS.update({f"no_{d}": flags for d, flags in REVERT.items()})
METRICS = (("image_auroc", "I-AUROC"), ("pixel_auroc", "P-AUROC"), ("pixel_aupro", "PRO"))


def run_variant(name: str, flags: list[str], out: str, config: str) -> dict:
  """Trains + evaluates one variant (skipped when its results exist); returns its row."""
  workdir = os.path.join(out, name)
  results = os.path.join(workdir, "eval", "results.json")
  timing = os.path.join(workdir, "wall_seconds.txt")
  data = os.path.join(out, "data")
  marker = os.path.join(workdir, "running.pid")
  if not os.path.isfile(results) and _alive(marker):
    print(f"{name}: another process runs it ({marker}); skipped", flush=True)
    return {}
  if not os.path.isfile(results):
    cmd = [sys.executable, "-m", "ssvp_jax.train", f"--config={config}", f"--workdir={workdir}",
           f"--config.train_data.root={data}/source", f"--config.eval_data.demo_target.root={data}/target", *flags]
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[2:])}", flush=True)
    start = time.time()
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "stdout.txt"), "w") as log:
      proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
      with open(marker, "w") as f:
        f.write(f"{proc.pid}\n")
      if proc.wait():
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    os.remove(marker)
    with open(timing, "w") as f:
      f.write(f"{time.time() - start:.1f}\n")
  with open(results) as f:
    mean = next(iter(json.load(f).values()))["mean"]
  wall = float(open(timing).read()) if os.path.isfile(timing) else float("nan")
  return {"variant": name, "flags": " ".join(flags), "wall_s": wall,
          **{label: 100 * mean[key] for key, label in METRICS}}


def _alive(marker: str) -> bool:
  """True when `marker` names a process that still runs (a variant another ablation process trains)."""
  try:
    os.kill(int(open(marker).read()), 0)
  except (OSError, ValueError):
    return False
  return True


def table(rows: list[dict]) -> str:
  head = "| variant | " + " | ".join(label for _, label in METRICS) + " | wall |\n"
  head += "|---|" + "---|" * (len(METRICS) + 1) + "\n"
  return head + "".join(f"| {r['variant']} | " + " | ".join(f"{r[label]:.1f}" for _, label in METRICS)
                        + f" | {r['wall_s'] / 60:.1f} min |\n" for r in rows)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default=os.path.join(ROOT, "runs", "ablation"))
  p.add_argument("--config", default="configs/demo.py")
  p.add_argument("--only", nargs="+", choices=list(VARIANTS), help="variants to run (default: all)")
  p.add_argument("--flags", default="", help='overrides added to every variant, e.g. "--config.optim.lr=1e-3"')
  args = p.parse_args()
  extra = args.flags.split()
  for name in VARIANTS:
    VARIANTS[name] = VARIANTS[name] + extra
  rows = []
  for name in args.only or VARIANTS:
    row = run_variant(name, VARIANTS[name], os.path.abspath(args.out), args.config)
    if row:
      rows.append(row)
      print(table(rows[-1:]).splitlines()[-1], flush=True)
  # The table holds every finished variant (also those another process ran), in VARIANTS order.
  done = [run_variant(n, VARIANTS[n], os.path.abspath(args.out), args.config) for n in VARIANTS
          if os.path.isfile(os.path.join(args.out, n, "eval", "results.json"))]
  with open(os.path.join(args.out, "ablation.md"), "w") as f:
    f.write(table(done))
  print(table(done))
  return 0


if __name__ == "__main__":
  sys.exit(main())
