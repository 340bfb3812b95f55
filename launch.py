"""Trains and evaluates a sequential recommender: parse config, build, run.

  python launch.py                                   # synthetic demo
  python launch.py --config=configs/sasrec_video.py --workdir=runs/video
  python launch.py --config=configs/sasrec_video.py:method=cas,eps=0.1 \\
      --config.train.epochs=5
  python launch.py --config=configs/sasrec_video.py --show_config  # all fields

All logic lives in `cat_jax.train.train_and_evaluate`. `--show_config`
prints every config field with its value and its one-line comment.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from cat_jax import config_lib

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_CONFIG = os.path.join(_HERE, "configs", "default.py")


def _fail(message: str, code: int = 2):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


try:
  # config_flags reads sys.argv here already (to define the --config.*
  # overrides), so a mistyped field can fail at this point.
  config_flags.DEFINE_config_file(
      "config", _DEFAULT_CONFIG,
      "Config file (optionally file.py:key=value,...); override any field "
      "with --config.<section>.<field>=value (list them with --show_config).",
      lock_config=True)
except Exception as e:  # noqa: BLE001 (reported as one line)
  _fail(config_lib.command_line_error(e, sys.argv, _DEFAULT_CONFIG))

flags.DEFINE_string("workdir", None,
                    "Output directory (default: runs/<config name>).")
flags.DEFINE_bool("show_config", False,
                  "Print every config field (value and comment) and exit.")
flags.DEFINE_bool("retrain", False,
                  "Delete and retrain the phases of --workdir that were "
                  "trained with other settings (instead of refusing).")
flags.DEFINE_string("coordinator_address", None,
                    "Multi-host: host:port of process 0 (omit on one host; "
                    "automatic on TPU and SLURM).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize (auto-detects TPU/SLURM "
                  "when the three flags above are not given).")
FLAGS = flags.FLAGS


def parse_flags(argv):
  """absl's flag parsing, with config mistakes as one line each."""
  try:
    rest = FLAGS(argv)
    FLAGS.config.to_dict()  # a missing config file only shows up on use
    return rest
  except (flags.Error, OSError, ValueError, AttributeError) as e:
    _fail(config_lib.command_line_error(e, argv, _DEFAULT_CONFIG))


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  config = FLAGS.config
  if FLAGS.show_config:
    print(config_lib.describe(config))
    return
  from cat_jax import checkpoints, report, train, writer
  writer.quiet_library_logs()
  import jax  # after flag parsing, so --help is fast

  if FLAGS.distributed or FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  workdir = FLAGS.workdir or os.path.join(
      "runs", os.path.splitext(os.path.basename(
          flags.FLAGS["config"].config_filename))[0])
  logging.info("JAX %s on %s; process %d/%d; workdir %s", jax.__version__,
               jax.devices(), jax.process_index(), jax.process_count(),
               workdir)
  try:
    results = train.train_and_evaluate(config, workdir, retrain=FLAGS.retrain)
  except checkpoints.Interrupted as e:
    _fail(str(e), 128 + e.signum)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    # Bad input: say what is wrong, once, without a deep traceback.
    _fail(str(e), 1)
  if writer.is_chief():
    print(report.run_summary(results, workdir, config))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
