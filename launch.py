"""Trains and evaluates a sequential recommender: parse config, build, run.

  python launch.py                                   # synthetic demo
  python launch.py --config=configs/sasrec_video.py --workdir=runs/video
  python launch.py --config=configs/sasrec_video.py:method=cas,eps=0.1 \\
      --config.train.epochs=5
  python launch.py --config=configs/sasrec_video.py --show_config  # all fields

All logic lives in `cat_jax.train.train_and_evaluate`. `--show_config`
prints every config field with its value and its one-line comment.

A mistake prints one `error: ...` line on stderr. Exit codes: 0 done; 1 bad
input (a config value out of range, the data, the workdir); 2 usage error
(unknown flag, config field, config file or config argument, a value that
does not parse); 128+N stopped by signal N (the same command resumes).
"""

import os
import re
import signal
import sys

from absl import app, flags
from ml_collections import config_flags

from cat_jax import config_lib

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_CONFIG = os.path.join(_HERE, "configs", "default.py")


# Exit codes (README): a run that cannot go ahead with what it was given,
# and a command line that cannot be parsed.
BAD_INPUT, USAGE = 1, 2
# absl's help flags, which print the usage and exit 1.
_HELP_FLAGS = ("?", "h", "help", "helpshort", "helpfull", "helpxml")


def _fail(message: str, code: int = USAGE):
  message = " ".join(str(message).split())  # one line, whatever it holds
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def _exit_on_signal(signum, frame):
  """SIGTERM or Ctrl-C outside training (`checkpoints.Preemption` handles
  them during it, with a checkpoint): stop at once, with one line.

  An exception raised here could land in a callback that swallows it (JAX's
  garbage-collection callback does), so the process exits right here;
  nothing is left half-written that matters (files are written atomically,
  the workdir lock is released by the kernel).
  """
  del frame
  print(f"error: stopped by signal {signum} (run the same command to "
        "resume)", file=sys.stderr, flush=True)
  os._exit(128 + signum)


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
                    "Output directory (default: runs/ and a name made of the "
                    "config file and its arguments, e.g. "
                    "runs/sasrec_video_method-linear_seed1).")
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


def run_name(spec: str) -> str:
  """A folder name for a --config value (launch.py's default workdir).

  The config file's name, then each of its arguments: a number follows its
  key ('default.py:eps=0.5' -> 'default_eps0.5'), other values after a '-'
  ('configs/sasrec_video.py:method=linear,seed=1' ->
  'sasrec_video_method-linear_seed1'), a path by its file name. Letters,
  digits, '.', '-' and '_' only.
  """
  path, _, arg = spec.partition(":")
  parts = [os.path.splitext(os.path.basename(path))[0]]
  for item in arg.split(","):
    key, _, value = item.partition("=")
    value = os.path.basename(value.rstrip("/"))
    numeric = re.fullmatch(r"[-+]?[\d.]+(e[-+]?\d+)?", value)
    parts.append(key + (value if numeric else f"-{value}" if value else ""))
  name = "_".join(re.sub(r"[^\w.]+", "-", p, flags=re.ASCII).strip("-.")
                  for p in parts)
  return re.sub(r"_+", "_", name).strip("_") or "run"


def _asks_for_help(argv) -> bool:
  return any(a.startswith("-") and a.lstrip("-").partition("=")[0] in
             _HELP_FLAGS for a in argv[1:])


def _flag_hint(message: str) -> str:
  """' (did you mean --config.train.epochs or --config.adv.epochs?)' for
  `--epochs`, or ''."""
  unknown = re.search(r"Unknown command line flag '([\w.]+)'", message)
  if not unknown:
    return ""
  name = unknown.group(1)
  fields = config_lib.flat_fields(config_lib.base_config())
  match = [f"--config.{f}" for f in fields if f.endswith("." + name)]
  return f" (did you mean {' or '.join(match)}?)" if match else ""


def parse_flags(argv):
  """absl's flag parsing, with config mistakes as one line each."""
  argv = ["--help" if a == "-h" else a for a in argv]  # absl knows -? only
  try:
    rest = FLAGS(argv)
    FLAGS.config.to_dict()  # a missing config file only shows up on use
    return rest
  except SystemExit as e:
    # absl's --help prints the usage, then exits 1; asking for help is no
    # mistake.
    if _asks_for_help(argv):
      sys.exit(0)
    raise e
  except (flags.Error, OSError, ValueError, AttributeError) as e:
    message = config_lib.command_line_error(e, argv, _DEFAULT_CONFIG)
    _fail(message + _flag_hint(message))


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  config = FLAGS.config
  if FLAGS.show_config:
    print(config_lib.describe(config))
    return
  # Several hosts leave SIGTERM to JAX's preemption service.
  signals = [signal.SIGINT]
  if not (FLAGS.distributed or FLAGS.coordinator_address):
    signals.append(signal.SIGTERM)
  for s in signals:
    signal.signal(s, _exit_on_signal)
  try:
    _run(config)
  except KeyboardInterrupt:  # a second Ctrl-C during training
    _fail("stopped by Ctrl-C (run the same command to resume)",
          128 + signal.SIGINT)


def _run(config):
  """Trains and prints the summary; user mistakes exit with one line."""
  from cat_jax import checkpoints, report, train, writer
  writer.quiet_library_logs()
  import jax  # after flag parsing, so --help is fast

  if FLAGS.distributed or FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  # The workdir, JAX and its devices are logged by `train` once the config,
  # workdir and data are checked, so that a mistake prints its line alone.
  workdir = FLAGS.workdir or os.path.join(
      "runs", run_name(FLAGS["config"].config_filename))
  try:
    results = train.train_and_evaluate(config, workdir, retrain=FLAGS.retrain)
  except checkpoints.Interrupted as e:
    _fail(str(e), 128 + e.signum)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    # Bad input: say what is wrong, once, without a deep traceback.
    _fail(str(e), BAD_INPUT)
  except OSError as e:
    # A write the workdir contract does not wrap (metrics.jsonl, a log):
    # a full disk or a folder that is not writable. Checkpoints saved before
    # it are intact.
    _fail(f"{e.strerror or e} ({e.filename or workdir}): the disk is full "
          "or not writable; make room and run the same command to resume.",
          BAD_INPUT)
  if writer.is_chief():
    print(report.run_summary(results, workdir, config))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
