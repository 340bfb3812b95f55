"""Faults a cluster produces (issue 31; docs/workdir.md): two runs in one
workdir, damaged or half-written checkpoints, SIGKILL at any moment, a full
disk. Each ends with training resumed from the newest intact state and one
line saying so, or with one line that says what is wrong."""

import importlib.util
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cat_jax import checkpoints, config_lib, models, phase, train
from cat_jax import workdir_lock
from conftest import tree_digest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Both phases 4 epochs, evaluated (and saved) every 2: each phase holds two
# `latest` checkpoints, so that every fallback can be reached.
BASE = {"train.epochs": 4, "train.eval_every": 2, "adv.method": "linear",
        "adv.eps": 0.5, "adv.epochs": 4, "adv.eval_every": 2}
LONGER = {**BASE, "adv.epochs": 6}


def untimed(results: dict) -> dict:
  """Each phase's results without the wall-clock time."""
  return {name: {k: v for k, v in r.items() if k != "train_s"}
          for name, r in results.items() if name in ("pretrain", "linear")}


def config(**over):
  from conftest import tiny_config
  return tiny_config(**over)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished run of BASE (copied by the tests that damage it)."""
  root = tmp_path_factory.mktemp("faults") / "run"
  return root, train.train_and_evaluate(config(**BASE), str(root))


@pytest.fixture(scope="module")
def longer(tmp_path_factory):
  """LONGER trained without interruption: what a resumed run must give."""
  root = tmp_path_factory.mktemp("faults") / "longer"
  return train.train_and_evaluate(config(**LONGER), str(root))


def copy_of(trained, tmp_path):
  dst = tmp_path / "run"
  shutil.copytree(trained[0], dst)
  return dst


def flip_bytes(step_dir):
  """64 flipped bytes in every array file of a checkpoint (as a failing
  disk would leave them)."""
  for d, _, files in os.walk(step_dir):
    if os.path.basename(d) == "d":
      for f in files:
        with open(os.path.join(d, f), "r+b") as fh:
          data = bytearray(fh.read())
          mid = len(data) // 2
          data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
          fh.seek(0)
          fh.write(data)


def empty_manifest(step_dir):
  """The OCDBT manifest truncated to nothing (a half-written copy)."""
  open(os.path.join(step_dir, "default", "manifest.ocdbt"), "w").close()


def rewrite(w, kind_dir, step, change, keep_checksum):
  """Replaces checkpoint `step` of `w/kind_dir` by `change(state)`, saved by
  Orbax alone: with the old checksum (silent corruption that Orbax reads
  without complaint) or none (a checkpoint of an older version)."""
  c = config(**BASE)
  n_items = len(open(w / "item_ids.txt").read().splitlines())
  model = models.build_model(c.model, n_items, c.data.max_len)
  template = train.init_state(model, train.make_optimizer(c.train),
                              jax.random.PRNGKey(0), c.data.max_len)
  meta = json.load(open(w / kind_dir / str(step) / "_CHECKPOINT_METADATA"))
  plain = ocp.CheckpointManager(str(w / kind_dir))
  state = plain.restore(step, args=ocp.args.StandardRestore(
      jax.tree.map(ocp.utils.to_shape_dtype_struct, template)))
  plain.delete(step)
  plain.save(step, args=ocp.args.StandardSave(change(state)),
             custom_metadata=meta["custom_metadata"] if keep_checksum else {})
  plain.wait_until_finished()
  plain.close()


def garbage(state):
  return state.replace(params=jax.tree.map(lambda x: x + 0.5, state.params))


def steps(folder) -> list:
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def damaged_lines(caplog) -> list:
  return [r.getMessage() for r in caplog.records
          if "is damaged" in r.getMessage()]


# ----------------------------------------------------------------------------
# Damaged and half-written checkpoints.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["garbage", "manifest", "all"])
def test_a_damaged_checkpoint_falls_back_and_says_so(trained, longer,
                                                     tmp_path, caplog, case):
  """The issue's cases 2 and 3 (the newest `latest` of phase 2 with other
  values that Orbax reads without complaint, or its manifest emptied; then
  more phase-2 epochs), and every checkpoint of the phase with 64 flipped
  bytes in each array file: training resumes from the newest intact state,
  says so in one line, moves the damaged files aside and ends exactly
  where an uninterrupted run ends."""
  w = copy_of(trained, tmp_path)
  pdir = w / "linear"
  selected = json.load(open(pdir / "best.json"))["epoch"]
  if case == "all":
    targets = [pdir / k / str(s) for k in ("latest", "best")
               for s in steps(pdir / k)]
    expect = "training resumes from the phase start (epoch 0)"
  else:
    targets = [pdir / "latest" / "4"]
    expect = "training resumes from latest/2 (epoch 2)"
  for t in targets:
    if case == "garbage":
      rewrite(w, "linear/latest", 4, garbage, keep_checksum=True)
    else:
      (flip_bytes if case == "all" else empty_manifest)(t)
  damaged = {(t.parent.name, t.name): tree_digest(t) for t in targets}
  best = tree_digest(pdir / "best" / str(selected))
  with caplog.at_level("WARNING"):
    r = train.train_and_evaluate(config(**LONGER), str(w))
  assert untimed(r) == untimed(longer)
  lines = damaged_lines(caplog)
  assert len(lines) == 1 and lines[0].startswith("[linear] "), lines
  assert expect in lines[0]
  read = targets if case != "all" else [pdir / k / str(selected)
                                         for k in ("best", "latest")]
  assert all(f"{t} is damaged" in lines[0] for t in read), lines[0]
  reason = {"garbage": "its arrays differ from what was saved (checksum "
                       "mismatch)", "manifest": "Orbax cannot read it"}
  assert reason.get(case, "") in lines[0]
  assert "does not match this model" not in caplog.text
  # Moved aside with a note, byte for byte, not deleted.
  aside = {n: pdir / "aside" / n for n in os.listdir(pdir / "aside")}
  for (kind, step), digest in damaged.items():
    [found] = [p for n, p in aside.items()
               if n.startswith(f"{kind}-{step}-")]
    kept = tree_digest(found)
    assert "why.txt" in kept
    kept.pop("why.txt")
    assert kept == digest
  if case != "all":  # the selected checkpoint, tested before, is kept
    assert tree_digest(pdir / "best" / str(selected)) == best
  if case == "all":  # the selection was made again: its records set aside
    assert any(n.startswith("best.json.") for n in aside)
    assert any(n.startswith("results.json.") for n in aside)


def _state(value: float, step: int):
  """A small TrainState whose arrays all hold `value`."""
  value = float(value)
  return train.TrainState(step=jnp.int32(step),
                          params={"w": jnp.full((3, 4), value)},
                          opt_state=(jnp.full((4,), value),))


def _stacked_runs(tmp_path, selected):
  """_Runs of stacked runs (one per entry of `selected`), each with
  latest/2 and latest/4 of distinct states, best/<selected epoch> and its
  selection record."""
  dirs = [str(tmp_path / f"seed{r}") for r in range(len(selected))]
  for r, (d, b) in enumerate(zip(dirs, selected)):
    for kind, epochs in (("latest", (2, 4)), ("best", (b,))):
      mgr = checkpoints.manager(os.path.join(d, "pretrain", kind))
      for e in epochs:
        checkpoints.save(mgr, e, _state(10 * r + e, 5 * e), wait=True)
      mgr.close()
    sel = checkpoints.Selection("ndcg@10", epoch=b, value=0.5, last_eval=4)
    checkpoints.write_json(os.path.join(d, "pretrain", "best.json"),
                           sel.to_json())
  keys = [jax.random.PRNGKey(r) for r in range(len(dirs))]
  return phase._Runs("pretrain", dirs, [None] * len(dirs), keys,
                     len(dirs) > 1, "ndcg@10")


def test_the_selected_best_is_the_fallback_after_both_latest(tmp_path,
                                                             caplog):
  runs = _stacked_runs(tmp_path, selected=[4])
  for e in (2, 4):
    empty_manifest(tmp_path / "seed0" / "pretrain" / "latest" / str(e))
  with caplog.at_level("WARNING"):
    state, epoch = phase._resume(runs, _state(-1.0, 0), patience=0)
  runs.close()
  assert epoch == 4 and float(state.params["w"][0, 0]) == 4.0
  # The latest says where training is (the workdir checks read it).
  assert steps(tmp_path / "seed0" / "pretrain" / "latest") == [4]
  [line] = damaged_lines(caplog)
  assert "latest/4 is damaged" in line and "latest/2 is damaged" in line
  assert line.endswith("latest/4 restored from best/4; training resumes "
                       "from best/4 (epoch 4)")


def test_stacked_runs_resume_at_the_newest_epoch_they_all_have_intact(
    tmp_path, caplog):
  """Runs trained as one program resume at one epoch: run 0's latest/4 is
  damaged and its selected epoch is 2, so both go back to epoch 2; run 1's
  intact latest/4 is moved aside (it is trained again)."""
  runs = _stacked_runs(tmp_path, selected=[2, 4])
  flip_bytes(tmp_path / "seed0" / "pretrain" / "latest" / "4")
  start = phase.stack_runs([_state(-1.0, 0), _state(-1.0, 0)])
  with caplog.at_level("WARNING"):
    state, epoch = phase._resume(runs, start, patience=0)
  runs.close()
  assert epoch == 2
  np.testing.assert_array_equal(state.params["w"][:, 0, 0], [2.0, 12.0])
  assert steps(tmp_path / "seed1" / "pretrain" / "latest") == [2]
  aside = [os.listdir(tmp_path / f"seed{r}" / "pretrain" / "aside")
           for r in (0, 1)]
  assert [[n.split("-")[:2] for n in a] for a in aside] == [
      [["latest", "4"]], [["latest", "4"]]]
  lines = [r.getMessage() for r in caplog.records
           if "training resumes from" in r.getMessage()]
  assert len(lines) == 2 and all("latest/2 (epoch 2)" in l for l in lines)
  assert "latest/4 is damaged" in lines[0] and "seed0" in lines[0]
  assert "latest/4 set aside (training resumes before it)" in lines[1]
  assert "seed1" in lines[1]


def test_a_lost_selection_trains_the_phase_again_from_its_start(tmp_path,
                                                                 caplog):
  """Run 0's selected epoch 4 has no intact copy left (best/4 gone,
  latest/4 damaged): its selection is made again, so the phase starts
  again, for both stacked runs; run 1 keeps its selection and best."""
  runs = _stacked_runs(tmp_path, selected=[4, 4])
  shutil.rmtree(tmp_path / "seed0" / "pretrain" / "best" / "4")
  flip_bytes(tmp_path / "seed0" / "pretrain" / "latest" / "4")
  start = phase.stack_runs([_state(-1.0, 0), _state(-1.0, 0)])
  with caplog.at_level("WARNING"):
    state, epoch = phase._resume(runs, start, patience=0)
  runs.close()
  assert epoch == 0
  np.testing.assert_array_equal(state.params["w"], start.params["w"])
  assert [r.epoch for r in runs.selection] == [-1, 4]
  assert not os.path.exists(tmp_path / "seed0" / "pretrain" / "best.json")
  assert steps(tmp_path / "seed1" / "pretrain" / "best") == [4]
  lines = damaged_lines(caplog)
  assert len(lines) == 1 and "seed0" in lines[0]
  assert "no intact copy of the selected epoch 4 is left" in lines[0]
  assert "training resumes from the phase start (epoch 0)" in lines[0]


def test_damage_is_never_blamed_on_the_config(tmp_path):
  """Another model (other shapes) is the config's fault; a damaged
  checkpoint or record of the same model is not."""
  mgr = checkpoints.manager(str(tmp_path / "latest"))
  checkpoints.save(mgr, 2, _state(1.0, 2), wait=True)
  other = train.TrainState(step=jnp.int32(0), params={"w": jnp.ones((3, 5))},
                           opt_state=(jnp.ones((4,)),))
  with pytest.raises(ValueError, match="does not match this model/config"):
    checkpoints.restore(mgr, other, 2)
  empty_manifest(tmp_path / "latest" / "2")
  with pytest.raises(checkpoints.CheckpointDamaged) as e:
    checkpoints.restore(mgr, _state(0.0, 0), 2)
  assert "Orbax cannot read it" in str(e.value) and "\n" not in str(e.value)
  mgr.close()
  (tmp_path / "best.json").write_text('{"epoch": 4, "ndcg')  # torn
  with pytest.raises(checkpoints.CheckpointDamaged,
                     match="best.json is damaged: it is not valid JSON"):
    checkpoints.Selection.load(str(tmp_path / "best.json"), "ndcg@10")


def test_a_non_finite_loss_after_a_restore_names_the_checkpoint(trained,
                                                                tmp_path):
  """A checkpoint saved without a checksum (an older version) and damaged
  so that training diverges: the error names it, not the learning rate."""
  w = copy_of(trained, tmp_path)
  rewrite(w, "linear/latest", 4,
          lambda s: s.replace(params=jax.tree.map(lambda x: x * np.nan,
                                                  s.params)),
          keep_checksum=False)
  with pytest.raises(FloatingPointError) as e:
    train.train_and_evaluate(config(**LONGER), str(w))
  msg = str(e.value)
  assert "\n" not in msg and "phase 'linear'" in msg
  assert f"first epoch after restoring {w}/linear/latest/4" in msg
  assert "likely cause" in msg


# ----------------------------------------------------------------------------
# A full disk.
# ----------------------------------------------------------------------------


def test_a_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(
    trained, longer, tmp_path):
  """Files may not grow past a limit (RLIMIT_FSIZE, as a full disk: writes
  fail) that the small JSON files stay under but checkpoint arrays do not:
  one line, then the same command, with room, resumes from epoch 4."""
  w = copy_of(trained, tmp_path)
  sizes = lambda pred: [os.path.getsize(os.path.join(d, f))
                        for d, _, fs in os.walk(w) for f in fs
                        if pred(os.path.join(d, f))]
  ckpt = max(sizes(lambda p: "/latest/4/" in p and "linear" in p))
  other = max(sizes(lambda p: "/latest/" not in p and "/best/" not in p))
  limit = other + 4096  # room for the records and a few metrics lines
  assert limit < ckpt, (limit, ckpt)
  old = resource.getrlimit(resource.RLIMIT_FSIZE)
  old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG
  try:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
    with pytest.raises(checkpoints.SaveFailed) as e:
      train.train_and_evaluate(config(**LONGER), str(w))
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, old)
    signal.signal(signal.SIGXFSZ, old_handler)
  msg = str(e.value)
  assert "\n" not in msg and "File too large: the disk is full" in msg, msg
  assert msg.startswith("Could not save the checkpoint of epoch 6 in ")
  assert "run the same command" in msg
  assert steps(w / "linear" / "latest") == [2, 4]
  r = train.train_and_evaluate(config(**LONGER), str(w))
  assert untimed(r) == untimed(longer)


# ----------------------------------------------------------------------------
# One writer per workdir.
# ----------------------------------------------------------------------------


def test_a_second_run_into_a_busy_workdir_stops_at_once(trained, tmp_path,
                                                         monkeypatch):
  w = copy_of(trained, tmp_path)
  held = workdir_lock.Held()
  held.acquire([str(w)])  # as a running job does
  before = tree_digest(w)
  t0 = time.time()
  with pytest.raises(workdir_lock.WorkdirBusy) as e:
    train.train_and_evaluate(config(**BASE), str(w))
  msg = str(e.value)
  assert time.time() - t0 < 5
  assert "\n" not in msg and f"workdir {w} is in use by another run" in msg
  assert f"pid {os.getpid()} on host " in msg and "running since" in msg
  assert "another --workdir" in msg
  assert tree_digest(w) == before
  # Several runs in one program lock every workdir: a busy one stops all,
  # also when it became busy after the first look (here: no first look),
  # and a new workdir is not left behind.
  new = tmp_path / "new"
  with monkeypatch.context() as m:
    m.setattr(workdir_lock, "check_free", lambda workdirs: None)
    with pytest.raises(workdir_lock.WorkdirBusy):
      train.train_runs(config(**BASE), [str(new), str(w)], [1, 0])
  assert not new.exists() and tree_digest(w) == before
  held.release()
  r = train.train_and_evaluate(config(**BASE), str(w))
  assert untimed(r) == untimed(trained[1])


# ----------------------------------------------------------------------------
# SIGKILL at any moment, and a second launch: the command line.
# ----------------------------------------------------------------------------

# Runs launch.py, killed by SIGKILL at a fault point (or, 'between', stopped
# by SIGSTOP, for the test to send a second launch and the SIGKILL).
DRIVER = r"""
import os, runpy, signal, sys
point, launch = sys.argv[1], sys.argv[2]
sys.argv = [launch] + sys.argv[3:]
from cat_jax import checkpoints, evaluate, train

def fault():
  os.kill(os.getpid(),
          signal.SIGSTOP if point == "between" else signal.SIGKILL)

if point == "epoch":  # phase 1, after epoch 3: between two evaluations
  reached = checkpoints.Preemption.reached
  def patched(self, mgr, epoch):
    if epoch == 3 and "pretrain" in str(mgr.directory):
      fault()
    return reached(self, mgr, epoch)
  checkpoints.Preemption.reached = patched
elif point == "save":  # phase 1's latest/4 is being written (asynchronously)
  save = checkpoints.save
  def patched(mgr, step, state, wait=False):
    save(mgr, step, state, wait)
    if step == 4 and str(mgr.directory).endswith(os.path.join("pretrain",
                                                              "latest")):
      fault()
  checkpoints.save = patched
elif point == "test":  # phase 1's test evaluation
  split_inputs = evaluate.split_inputs
  def patched(data, split, *args, **kwargs):
    if split == "test":
      fault()
    return split_inputs(data, split, *args, **kwargs)
  evaluate.split_inputs = patched
elif point == "between":  # phase 1 done and recorded, phase 2 not begun
  run_phase = train.run_phase
  def patched(name, *args, **kwargs):
    if name != "pretrain":
      fault()
    return run_phase(name, *args, **kwargs)
  train.run_phase = patched
runpy.run_path(launch, run_name="__main__")
"""


def _flags() -> list:
  """launch.py flags that give config(**BASE) (the fixture's run)."""
  spec = importlib.util.spec_from_file_location(
      "default_config", os.path.join(ROOT, "configs", "default.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  default = config_lib.flat_fields(module.get_config())
  mine = config_lib.flat_fields(config(**BASE))
  return [f"--config.{k}={v}" for k, v in mine.items() if default[k] != v]


def _launch(point, workdir, log):
  """launch.py under DRIVER, in the test's environment (same devices and
  compilation cache as the fixture's run in this process)."""
  with open(log, "w") as out:
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, point,
         os.path.join(ROOT, "launch.py"), f"--workdir={workdir}", *_flags()],
        cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def _stopped(proc, timeout=120) -> bool:
  """Waits until `proc` is stopped (SIGSTOP; Linux /proc)."""
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    with open(f"/proc/{proc.pid}/stat") as f:
      if f.read().rsplit(")", 1)[1].split()[0] == "T":
        return True
    time.sleep(0.05)
  return False


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="watches /proc for the stopped process")
def test_sigkill_at_any_moment_resumes_to_the_same_result(trained,
                                                          tmp_path):
  """SIGKILL during an epoch, during a checkpoint save, during the test
  evaluation and between the phases, each followed by the same command:
  the run ends with exactly the results of the run never interrupted (the
  fixture's, same machine). While it is stopped between the phases, a
  second launch into its workdir exits 1 at once with one line and changes
  nothing; once the first is killed, the same command works."""
  w = tmp_path / "run"
  log = lambda name: tmp_path / f"{name}.log"
  for point in ("epoch", "save", "test"):
    proc = _launch(point, w, log(point))
    assert proc.wait(timeout=300) == -signal.SIGKILL, \
        open(log(point)).read()[-3000:]
    if point == "save":  # the interrupted save never committed epoch 4
      assert 4 not in steps(w / "pretrain" / "latest")

  first = _launch("between", w, log("between"))
  try:
    assert _stopped(first), open(log("between")).read()[-3000:]
    assert json.load(open(w / "results.json"))["pretrain"]
    before = tree_digest(w)
    t0 = time.time()
    second = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch.py"), f"--workdir={w}",
         *_flags()], cwd=ROOT, capture_output=True, text=True, timeout=120)
    took = time.time() - t0
  finally:
    first.kill()
    first.wait(timeout=60)
  lines = [l for l in second.stderr.splitlines() if l.strip()]
  assert second.returncode == 1, second.stderr[-3000:]
  assert lines == [lines[-1]] and lines[0].startswith(
      f"error: workdir {w} is in use by another run (pid {first.pid} on "
      "host "), second.stderr
  assert took < 30, took
  assert tree_digest(w) == before

  last = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch.py"), f"--workdir={w}",
       *_flags()], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert last.returncode == 0, last.stderr[-3000:]
  assert "Traceback" not in last.stderr
  done = json.load(open(w / "results.json"))
  assert untimed(done) == untimed(trained[1])
  # Every evaluation of the killed runs that is logged equals the
  # uninterrupted run's (an epoch retrained after a kill is logged again).
  ref = {(l["phase"], l["epoch"]): l["valid/ndcg@10"] for l in map(
      json.loads, open(trained[0] / "metrics.jsonl")) if "valid/ndcg@10" in l}
  got = [(l["phase"], l["epoch"], l["valid/ndcg@10"]) for l in map(
      json.loads, open(w / "metrics.jsonl")) if "valid/ndcg@10" in l]
  assert {(p, e) for p, e, _ in got} == set(ref)
  assert all(v == ref[(p, e)] for p, e, v in got)
