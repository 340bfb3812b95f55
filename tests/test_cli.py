"""launch.py as a user meets it: one-line errors, --show_config, the end-of-run
summary, and SIGTERM with an exact resume."""

import json
import os
import signal
import subprocess
import sys

import pytest

from cat_jax import config_lib, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config.data.synthetic.num_users=300",
         "--config.data.synthetic.num_items=100",
         "--config.data.synthetic.num_clusters=5"]


def run_cli(*args, timeout=300):
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"),
                         *args], capture_output=True, text=True, cwd=ROOT,
                        env={**os.environ, "XLA_FLAGS": ""}, timeout=timeout)


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
  assert "selected epoch 3 of 5" in text and "-50.0%" in text
  assert "ends below phase 1 on validation" in text and "eps_sweep" in text
  res["cas"]["valid/ndcg@10"] = 0.06
  assert "ends below" not in report.run_summary(res, "runs/x", config)


def test_sigterm_saves_and_the_same_command_resumes_exactly(tmp_path):
  """Also the default config, shrunk, trained end to end from the CLI."""
  args = [*SMALL, "--config.train.epochs=40", "--config.train.eval_every=5",
          "--config.adv.epochs=1", "--config.model.hidden=16",
          "--config.model.name=gru4rec"]  # compiles faster than SASRec
  full = run_cli(*args, f"--workdir={tmp_path / 'full'}")
  assert full.returncode == 0, full.stderr[-2000:]
  assert "Summary (" in full.stdout and "selected epoch" in full.stdout
  assert "cas vs pretrain" in full.stdout
  assert "steps/s" in full.stderr and "ETA" in full.stderr
  assert "including compilation" in full.stderr
  assert "Unable to initialize backend" not in full.stderr
  assert set(json.load(open(tmp_path / "full" / "results.json"))) >= {
      "pretrain", "cas", "data", "popularity/valid"}

  cmd = [sys.executable, os.path.join(ROOT, "launch.py"), *args,
         f"--workdir={tmp_path / 'cut'}"]
  proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "XLA_FLAGS": ""})
  seen = []
  for line in proc.stderr:  # wait for the first timed epoch, then stop it
    seen.append(line)
    if "[pretrain] epoch 7/40" in line:
      proc.send_signal(signal.SIGTERM)
      break
  rest = proc.stderr.read()
  proc.wait(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, "".join(seen) + rest
  assert "Traceback" not in rest
  last = [l for l in rest.splitlines() if l.strip()][-1]
  assert last.startswith("error: interrupted at epoch ")
  epoch = int(last.split("epoch ")[1].split()[0])
  assert 7 <= epoch < 40
  steps = os.listdir(tmp_path / "cut" / "pretrain" / "latest")
  assert str(epoch) in steps

  again = run_cli(*args, f"--workdir={tmp_path / 'cut'}")
  assert again.returncode == 0, again.stderr[-2000:]
  assert f"resumed from epoch {epoch}" in again.stderr
  untimed = lambda d, p: {k: v for k, v in json.load(
      open(tmp_path / d / "results.json"))[p].items() if k != "train_s"}
  for phase in ("pretrain", "cas"):
    assert untimed("cut", phase) == untimed("full", phase)


def test_table2_at_another_eps_is_one_line(tmp_path):
  """A method folder trained at another eps: the runner names the folder
  and the ways out in one line, and leaves the run alone."""
  def table2(eps):
    return subprocess.run(
        [sys.executable, "-m", "cat_jax.experiments.table2",
         "--config=configs/default.py", f"--workdir={tmp_path}", "--seeds=0",
         "--methods=cas", f"--eps=cas={eps}", *SMALL,
         "--config.model.name=gru4rec", "--config.train.epochs=1",
         "--config.adv.epochs=1"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "XLA_FLAGS": ""})
  first = table2(0.5)
  assert first.returncode == 0, first.stderr
  results = tmp_path / "seed0" / "cas" / "results.json"
  before = results.read_text()
  r = table2(0.25)
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
  line = [l for l in r.stderr.splitlines() if "trained with other settings" in l]
  assert len(line) == 1 and "adv.eps: 0.5 -> 0.25" in line[0], r.stderr
  assert results.read_text() == before
