"""launch.py as a user meets it: one-line errors, --show_config, the end-of-run
summary, and SIGTERM with an exact resume."""

import json
import os
import re
import signal
import subprocess
import sys

import jax
import pytest

from cat_jax import checkpoints, config_lib, report
from conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config.data.synthetic.num_users=300",
         "--config.data.synthetic.num_items=100",
         "--config.data.synthetic.num_clusters=5"]


def run_cli(*args, timeout=300):
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"),
                         *args], capture_output=True, text=True, cwd=ROOT,
                        env={**os.environ, "XLA_FLAGS": xla_flags()},
                        timeout=timeout)


def sigterm_at(marker: str, *args, env=None):
  """Runs launch.py, sends SIGTERM once a stderr line holds `marker`, and
  returns (exit code, whole stderr, stderr after the marker's line)."""
  proc = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=ROOT,
      stderr=subprocess.PIPE, text=True,
      env={**os.environ, "XLA_FLAGS": xla_flags(), **(env or {})})
  seen = []
  for line in proc.stderr:
    seen.append(line)
    if marker in line:
      proc.send_signal(signal.SIGTERM)
      break
  rest = proc.stderr.read()
  proc.wait(timeout=120)
  return proc.returncode, "".join(seen) + rest, rest


@pytest.mark.parametrize("args,expect", [
    (["--config.train.epoch=5"],
     "unknown config field --config.train.epoch (did you mean train.epochs?)"),
    (["--config=configs/sasrec_vide.py"],
     "config file not found: configs/sasrec_vide.py (did you mean "
     "sasrec_video.py?)"),
    (["--config=configs/sasrec_video.py:mthod=cas"],
     "Unknown config argument 'mthod' (did you mean method?)"),
    (["--config.train.epochs=abc"], "--config.train.epochs=abc: invalid"),
])
def test_config_mistakes_are_one_line(args, expect):
  r = run_cli(*args, "--workdir=/nonexistent/never_written")
  assert r.returncode == 2
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert lines == [lines[-1]] and lines[0].startswith("error: "), r.stderr
  assert expect in lines[0]
  assert not os.path.exists("/nonexistent/never_written")


def test_every_mistake_is_one_line_with_its_exit_code(tmp_path):
  """Exit codes: 0 done (and --help), 1 bad input, 2 usage error; each
  mistake prints its one error line and nothing else (the run's first log
  lines come only once everything is checked). Also: the default workdir is
  named after the config file and its arguments."""
  bad = tmp_path / "bad.txt"
  bad.write_text("1 2 3 4\n2 x y\n")
  # A workdir whose phase 1 was trained with another model.hidden.
  spec = os.path.join(ROOT, "configs", "default.py") + ":eps=0.5"
  old = config_lib.load_config_file(spec)
  old.model.hidden = 7
  checkpoints.write_signature(
      old, str(tmp_path / "runs" / "default_eps0.5" / "pretrain"),
      checkpoints.PRETRAIN)
  never = f"--workdir={tmp_path / 'never_written'}"
  demo = config_lib.load_config_file(os.path.join(ROOT, "configs",
                                                  "default.py"))
  cases = {
      "help": (["--help"], 0, None),
      "flag": (["--epochs=3"], 2, "error: Unknown command line flag 'epochs' "
               "(did you mean --config.adv.epochs or --config.train.epochs?)"),
      "value": (["--config.train.epochs=-1", never], 1,
                "error: train.epochs must be positive, got -1."),
      "data": (["--config.data.name=file", never,
                f"--config.data.path={tmp_path / 'nowhere.txt'}"], 1,
               f"error: Data file not found: '{tmp_path / 'nowhere.txt'}'"),
      "line": (["--config.data.name=file", f"--config.data.path={bad}",
                never], 1, f"error: {bad}:2: item id 'x' is not an integer"),
      "workdir": ([f"--config={spec}"], 1, "error: runs/default_eps0.5/"
                  "pretrain was trained with other settings (model.hidden: "
                  f"7 -> {demo.model.hidden})"),
  }
  procs = {name: subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "launch.py"), *args],
      cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={**os.environ, "XLA_FLAGS": xla_flags()}) for name, (args, _, _) in
      cases.items()}
  for name, p in procs.items():
    out, err = p.communicate(timeout=120)
    _, code, start = cases[name]
    assert p.returncode == code, (name, err)
    if start is None:
      assert err == "" and "--show_config" in out, (name, err)
      continue
    assert out == "" and len(err.strip().splitlines()) == 1, (name, err)
    assert err.startswith(start), (name, err)
  assert not (tmp_path / "never_written").exists()
  assert not (tmp_path / "runs" / "default_eps0.5" / "config.json").exists()


def test_default_workdir_names_are_safe_and_readable():
  specs = {"configs/default.py:eps=0.5": "default_eps0.5",
           "/x/configs/sasrec_video.py:method=linear,seed=1":
               "sasrec_video_method-linear_seed1",
           "configs/default.py": "default",
           "c.py:path=/data/Beauty.txt,eps=1e-3": "c_path-Beauty.txt_eps1e-3",
           "c.py:method=a b/../;rm -rf": "c_method-rm-rf"}
  # launch.py reads the command line on import: one process for them all.
  r = subprocess.run(
      [sys.executable, "-c", "import json, sys, launch; print(json.dumps("
       "[launch.run_name(s) for s in json.loads(sys.stdin.read())]))"],
      input=json.dumps(list(specs)), capture_output=True, text=True,
      cwd=ROOT, timeout=60)
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout) == list(specs.values())


def test_show_config_lists_every_field_with_its_comment():
  r = run_cli("--config=configs/sasrec_video.py", "--config.adv.eps=0.3",
              "--show_config")
  assert r.returncode == 0, r.stderr
  out = r.stdout.splitlines()
  fields = config_lib.flat_fields(config_lib.base_config())
  assert len(out) == len(fields)
  assert "adv.eps = 0.3  # Perturbation size eps" in r.stdout
  assert "data.path = 'Video.txt'" in r.stdout
  assert all("  # " in line for line in out), [l for l in out if "#" not in l]
  assert "--show_config" in run_cli("--help").stdout


def test_paper_configs_default_to_the_validated_eps():
  def eps(model, data, arg=None):
    return config_lib.paper_config(model, data, arg).adv.eps
  for (model, data), table in config_lib.TUNED_EPS.items():
    for method, value in table.items():
      assert eps(model, data, f"method={method}") == value
    # The ablations differ from cas in the cascade only.
    assert eps(model, data, "method=cas_cross") == table["cas"]
    assert eps(model, data, "method=cas,eps=10") == 10.0  # the paper's
  assert eps("gru4rec", "ml1m") == config_lib.TUNED_EPS[("gru4rec",
                                                          "video")]["cas"]


def test_summary_says_when_phase_2_ends_below_phase_1(make_config):
  config = make_config(**{"adv.method": "cas", "adv.eps": 10.0})
  res = {"pretrain": {"selected_epoch": 20, "last_epoch": 20,
                      "valid/ndcg@10": 0.05, "test/ndcg@10": 0.048,
                      "test/hr@10": 0.09},
         "cas": {"selected_epoch": 3, "last_epoch": 5,
                 "valid/ndcg@10": 0.03, "test/ndcg@10": 0.024,
                 "test/hr@10": 0.05}}
  text = report.run_summary(res, "runs/x", config)
  assert "runs/x/results.json" in text
  assert "3/5" in text and "-50.0%" in text and "vs pretrain" in text
  assert "fewer epochs" in text  # no `none`: the reference trained less
  assert "ends below phase 1 on validation" in text and "eps_sweep" in text
  res["cas"]["valid/ndcg@10"] = 0.06
  assert "ends below" not in report.run_summary(res, "runs/x", config)


def test_summary_compares_every_phase_with_none(make_config, tmp_path):
  """Phases of earlier launches (results.json) are listed too, and every
  phase-2 method is compared with `none`."""
  config = make_config(**{"adv.method": "cas", "adv.eps": 0.1})
  row = lambda e, v, t: {"selected_epoch": e, "last_epoch": e + 2,
                         "valid/ndcg@10": v, "test/ndcg@10": t,
                         "test/hr@10": 2 * t}
  checkpoints.write_json(str(tmp_path / "results.json"), {
      "data": {"users": 3}, "pretrain": row(20, 0.05, 0.040),
      "none": row(4, 0.05, 0.050), "global": row(6, 0.06, 0.055)})
  text = report.run_summary({"cas": row(8, 0.07, 0.060)}, str(tmp_path),
                            config)
  lines = text.splitlines()
  order = [next(i for i, x in enumerate(lines) if x.strip().startswith(p))
           for p in ("pretrain", "none", "global", "cas")]
  assert order == sorted(order)
  assert "vs none" in text and "fewer epochs" not in text
  assert "+10.0%" in lines[order[2]] and "+20.0%" in lines[order[3]]
  assert "%" not in lines[order[0]] and "%" not in lines[order[1]]


def test_sigterm_saves_and_the_same_command_resumes_exactly(tmp_path):
  """Also the default config, shrunk, trained end to end from the CLI."""
  args = [*SMALL, "--config.train.epochs=40", "--config.train.eval_every=5",
          "--config.train.patience=0", "--config.adv.method=cas",
          "--config.adv.epochs=1", "--config.model.hidden=16",
          "--config.model.name=gru4rec",  # compiles faster than SASRec
          "--config.train.heartbeat_s=0.3"]
  full = run_cli(*args, f"--workdir={tmp_path / 'full'}")
  assert full.returncode == 0, full.stderr[-2000:]
  assert "Summary" in full.stdout and "results.json" in full.stdout
  assert "vs pretrain" in full.stdout and "fewer epochs" in full.stdout
  assert "steps/s" in full.stderr and "ETA" in full.stderr
  assert "including compilation" in full.stderr
  assert "Unable to initialize backend" not in full.stderr
  # What the log says (issue 29): the workdir first, rounded data
  # statistics, a line before each compilation, phase 1's loss alone.
  log = full.stderr
  assert f"] workdir {tmp_path / 'full'}; JAX {jax.__version__}, " in \
      log.splitlines()[0], log[:1000]
  assert re.search(r"avg_length \d+\.\d\d?, ", log), log[:2000]
  for what in ("[pretrain] compiling this phase's training program",
               "[cas] compiling its training program in the background",
               "[pretrain] compiling the ranking program",
               "[cas] cascade weights (Eq. 4.11) in ",
               # no silence while the first epoch compiles
               "[pretrain] epoch 1/40, with its program's compilation: "):
    assert what in log, what
  number = r"\d+\.\d{4}"
  assert re.search(rf"\[pretrain\] epoch 8/40 loss {number} \d", log), log
  assert re.search(rf"\[cas\] epoch 1/1 loss {number} \(bce {number}, "
                   rf"adv1 {number}, adv2 {number}\)", log), log
  assert "adv1 0.0000" not in log and "level-1 weights" not in log
  assert set(json.load(open(tmp_path / "full" / "results.json"))) >= {
      "pretrain", "cas", "data", "popularity/valid"}

  # Wait for the first timed epoch, then stop it.
  code, log, rest = sigterm_at("[pretrain] epoch 7/40", *args,
                               f"--workdir={tmp_path / 'cut'}")
  assert code == 128 + signal.SIGTERM, log
  assert "Traceback" not in rest
  last = [l for l in rest.splitlines() if l.strip()][-1]
  assert last.startswith("error: interrupted at epoch ")
  epoch = int(last.split("epoch ")[1].split()[0])
  assert 7 <= epoch < 40
  steps = os.listdir(tmp_path / "cut" / "pretrain" / "latest")
  assert str(epoch) in steps

  again = run_cli(*args, f"--workdir={tmp_path / 'cut'}")
  assert again.returncode == 0, again.stderr[-2000:]
  assert re.search(rf"resumed from epoch {epoch} \(best validation ndcg@10 "
                   r"so far \d\.\d{4}, at epoch \d+\)", again.stderr), \
      again.stderr
  untimed = lambda d, p: {k: v for k, v in json.load(
      open(tmp_path / d / "results.json"))[p].items() if k != "train_s"}
  for phase in ("pretrain", "cas"):
    assert untimed("cut", phase) == untimed("full", phase)


def test_a_signal_while_phase_2_compiles_ahead_exits_with_its_code(tmp_path):
  """SIGTERM during phase 1's first epoch, while `cas`'s program (bigger than
  phase 1's) still compiles on its background thread: the run waits for it
  and exits 143 with its one line. It used to abort (SIGABRT, 'FATAL:
  exception not rethrown'): the interpreter exited with XLA compiling."""
  code, log, rest = sigterm_at(
      "[pretrain] compiling this phase's training program", *SMALL,
      "--config.train.epochs=40", "--config.adv.method=cas",
      "--config.adv.epochs=1", f"--workdir={tmp_path}",
      env={"CAT_COMPILATION_CACHE": "off"})  # so that it compiles
  assert code == 128 + signal.SIGTERM, log
  assert "Traceback" not in log and "FATAL" not in log, log
  last = [l for l in rest.splitlines() if l.strip()][-1]
  assert last.startswith("error: interrupted at epoch 1 "), log


def test_table2_at_another_eps_is_one_line(tmp_path):
  """A method folder trained at another eps: the runner names the folder
  and the ways out in one line, and leaves the run alone."""
  def table2(eps):
    return subprocess.run(
        [sys.executable, "-m", "cat_jax.experiments.table2",
         "--config=configs/default.py", f"--workdir={tmp_path}", "--seeds=0",
         "--methods=cas", f"--eps=cas={eps}", *SMALL,
         # The SIGTERM test's model: its programs, compiled once.
         "--config.model.name=gru4rec", "--config.model.hidden=16",
         "--config.train.epochs=1", "--config.adv.epochs=1"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "XLA_FLAGS": xla_flags()})
  first = table2(0.5)
  assert first.returncode == 0, first.stderr
  results = tmp_path / "seed0" / "cas" / "results.json"
  before = results.read_text()
  r = table2(0.25)
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
  line = [l for l in r.stderr.splitlines() if "trained with other settings" in l]
  assert len(line) == 1 and "adv.eps: 0.5 -> 0.25" in line[0], r.stderr
  assert results.read_text() == before
