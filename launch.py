"""Trains and evaluates a sequential recommender: parse config, build, run.

  python launch.py                                   # synthetic demo
  python launch.py --config=configs/sasrec_video.py --workdir=runs/video
  python launch.py --config=configs/sasrec_video.py:method=cas,eps=10 \
      --config.train.epochs=5

All logic lives in `cat_jax.train.train_and_evaluate`.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))

config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "default.py"),
    "Config file (optionally file.py:key=value,...).", lock_config=True)
flags.DEFINE_string("workdir", None,
                    "Output directory (default: runs/<config name>).")
flags.DEFINE_string("coordinator_address", None,
                    "Multi-host: host:port of process 0 (omit on one host; "
                    "automatic on TPU and SLURM).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize (auto-detects TPU/SLURM "
                  "when the three flags above are not given).")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import jax  # after flag parsing, so --help is fast
  from cat_jax import train, writer
  writer.quiet_library_logs()

  if FLAGS.distributed or FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  config = FLAGS.config
  workdir = FLAGS.workdir or os.path.join(
      "runs", os.path.splitext(os.path.basename(
          flags.FLAGS["config"].config_filename))[0])
  logging.info("JAX %s on %s; process %d/%d; workdir %s", jax.__version__,
               jax.devices(), jax.process_index(), jax.process_count(),
               workdir)
  try:
    train.train_and_evaluate(config, workdir)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    # Bad input: say what is wrong without a deep traceback.
    logging.error("%s: %s", type(e).__name__, e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
