"""Train SSVP and evaluate it zero-shot.

    python -m ssvp_jax.train --config=configs/demo.py --workdir=runs/demo
    python -m ssvp_jax.train --config=configs/mvtec.py --workdir=runs/mvtec \
        --config.backbones.semantic.bundle=weights/clip-l14-336 \
        --config.backbones.structural.bundle=weights/dinov3-l16 \
        --config.train_data.root=/data/mvtec --config.eval_data.visa.root=/data/visa

Re-running the same command after an interruption resumes from the latest checkpoint.

Several processes (hosts) train one model together when given --coordinator_address,
--num_processes and --process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID,
or a SLURM/MPI launcher); see ssvp_jax/distributed.py.
"""

from __future__ import annotations

from absl import app, flags

from ssvp_jax import cli, distributed, report, trainer
from ssvp_jax.cli import FLAGS, setup

flags.DEFINE_string("coordinator_address", None, "host:port of process 0 in a multi-process run.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index (0 .. num_processes - 1).")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
  setup()
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  out = trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if distributed.is_main():
    print(report.format_markdown(out["results"]))
    if out.get("fewshot"):
      print(report.format_markdown(out["fewshot"]))


if __name__ == "__main__":
  cli.run(main)
