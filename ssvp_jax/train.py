"""Train SSVP and evaluate it zero-shot.

    python -m ssvp_jax.train --config=configs/demo.py --workdir=runs/demo
    python -m ssvp_jax.train --config=configs/mvtec.py --workdir=runs/mvtec \
        --config.clip.bundle=weights/clip-l14-336 --config.dino.bundle=weights/dinov3-l16 \
        --config.train_data.root=/data/mvtec --config.eval_data[0].root=/data/visa

Re-running the same command after an interruption resumes from the latest checkpoint.
"""

from __future__ import annotations

from absl import app

from ssvp_jax import report, trainer
from ssvp_jax.cli import FLAGS, setup_logging


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
  setup_logging()
  out = trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  print(report.format_markdown(out["results"]))


if __name__ == "__main__":
  app.run(main)
