"""The shell scripts: they parse, gpu_session.sh's local steps (the ones
that run on this machine, not on the device) do what their header says, and
every setting the headers list has its config."""

import glob
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = os.path.join(ROOT, "scripts", "gpu_session.sh")


@pytest.mark.parametrize("script", sorted(
    glob.glob(os.path.join(ROOT, "scripts", "*.sh"))))
def test_script_parses(script):
  subprocess.run(["bash", "-n", script], check=True)


def gpu(*args, cwd):
  return subprocess.run(["bash", GPU, *args], cwd=cwd, capture_output=True,
                        text=True, timeout=60,
                        env={**os.environ, "OUT": os.path.join(cwd, "out")})


def test_unknown_mode_is_refused_before_anything_runs(tmp_path):
  r = gpu("bnech", cwd=tmp_path)
  assert r.returncode == 2
  assert "unknown mode 'bnech'" in r.stderr and "pack_pretrain" in r.stderr
  assert not (tmp_path / "out").exists()


def fake_run(root, seed, finished=True):
  d = root / "paper_gru4rec_video" / f"seed{seed}"
  for sub in ("pretrain/latest/500", "pretrain/best/445", "none"):
    (d / sub).mkdir(parents=True)
    (d / sub / "x").write_text(sub)
  (d / "config.json").write_text("{}")
  if finished:
    (d / "pretrain" / "results.json").write_text("{}")
  return d


def test_pack_pretrain_copies_seed_files_and_phase_1_only(tmp_path):
  runs = tmp_path / "runs"
  fake_run(runs, 0)
  fake_run(runs, 1)
  r = gpu("pack_pretrain", str(runs / "paper_gru4rec_video"), "1",
          cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  got = tmp_path / ".runs" / "paper_gru4rec_video"
  assert sorted(p.name for p in got.iterdir()) == ["seed1"]
  assert (got / "seed1" / "config.json").exists()
  # A finished phase is recognized by `latest` at the last epoch, and
  # phase 2 starts from `best`: both travel; phase-2 runs do not.
  assert (got / "seed1/pretrain/latest/500/x").read_text() == \
      "pretrain/latest/500"
  assert (got / "seed1/pretrain/best/445/x").exists()
  assert not (got / "seed1" / "none").exists()


def test_pack_pretrain_refuses_an_unfinished_phase_1(tmp_path):
  runs = tmp_path / "runs"
  fake_run(runs, 2, finished=False)
  r = gpu("pack_pretrain", str(runs / "paper_gru4rec_video"), "2",
          cwd=tmp_path)
  assert r.returncode == 1
  assert "seed2/pretrain has no results.json" in r.stderr
  assert not (tmp_path / ".runs").exists()


def listed_settings(script: str, start: str, end: str) -> list:
  """The `<model>_<data>` settings in a script's header from the line that
  starts with `start` to the one that starts with `end`."""
  with open(os.path.join(ROOT, "scripts", script)) as f:
    text = f.read()
  block = text[text.index(start):]
  block = block[:block.index(end)]
  return re.findall(r"\b((?:sasrec|gru4rec)_[a-z0-9]+)\b", block)


def test_every_listed_setting_has_a_config():
  from cat_jax import config_lib
  cpu = listed_settings("cpu_paper.sh", "# SETTING:", "# STAGE:")
  gpu_ = listed_settings("gpu_session.sh", "# SETTING is one of",
                         "# Then,")
  assert "sasrec_clothing" in cpu and "gru4rec_clothing" in cpu
  assert sorted(gpu_) == sorted(cpu)
  for setting in cpu:
    # cpu_paper.sh: model=${setting%_*}, config configs/$setting.py.
    model, _, dataset = setting.rpartition("_")
    assert model in ("sasrec", "gru4rec") and dataset in \
        config_lib.PAPER_DATASETS, setting
    assert os.path.exists(os.path.join(ROOT, "configs", f"{setting}.py"))
