"""Recommendations out of a trained model: the top-K next items of each user.

Library (internal item ids 1..N, 0 = padding):

  from cat_jax import recommend
  ids, scores = recommend.top_k(model, params, histories, k=20)
  # ids [U, k] int32, scores [U, k] float32, best first

Command (the data's own user and item ids in and out):

  python -m cat_jax.recommend --workdir=runs/x --k=20 --out=recs.jsonl
  python -m cat_jax.recommend --workdir=runs/x --phase=cas --k=20 --out=recs.jsonl
  python -m cat_jax.recommend --workdir=runs/x --phase=cas --k=20 \\
      --users=users.txt --out=recs.jsonl

Without `--phase`, the phase-2 method trained last (`default_phase`), or
phase 1 when none has finished; the first line on stderr names the phase.
Without `--users` every user of the run's data is recommended for, from the
whole sequence (all interactions known, validation and test items
included). With `--users=FILE` the histories are `uid item item ...` lines in
the data's original ids (oldest first), and the command needs only
`<workdir>/config.json`, `<workdir>/item_ids.txt` and the checkpoint, not the
data file. Each output line is
`{"user": uid, "items": [original ids, best first], "scores": [...]}`; with
`--users`, also `"unknown": [...]`, the tokens of that line that are not
items of the run (skipped, and counted in one warning line).

Item ids are mapped back through `<workdir>/item_ids.txt`
(`checkpoints.write_item_ids`: line i is the original id of internal item i,
as a JSON value, so integer ids stay integers and string ids strings).
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import NamedTuple, Sequence

import ml_collections
import numpy as np

from cat_jax import data as data_lib
from cat_jax import checkpoints, poisoning, sharding
# The workdir's item_ids.txt is written by training (`checkpoints`); the names
# stay part of this module's API.
from cat_jax.checkpoints import ITEM_IDS, write_item_ids  # noqa: F401
from cat_jax.checkpoints import plain_id as _plain
# The device part lives in `topk`; its names are part of this module's API.
from cat_jax.topk import TopK, make_top_k, top_k  # noqa: F401
from cat_jax.writer import is_chief


class RecommendError(ValueError):
  """A problem with the command's inputs; the message is one line."""


# ----------------------------------------------------------------------------
# Original ids.
# ----------------------------------------------------------------------------


def read_item_ids(workdir: str) -> list:
  """The original item ids of a run: element i-1 is internal item i (as
  `Dataset.item_ids`). FileNotFoundError if the run has no item_ids.txt."""
  path = os.path.join(workdir, ITEM_IDS)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found (written by training; or run "
                            "without --users to read the ids from the data)")
  out = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        raise RecommendError(f"{path}:{lineno}: not a JSON id: "
                             f"{line.strip()[:80]!r}") from None
  return out


_INT = re.compile(r"^[+-]?\d+$")


def _id_token(token: str):
  """A user id token as output: an int if it is an integer, else the str."""
  return int(token) if _INT.match(token) else token


class UserLine(NamedTuple):
  lineno: int
  user: object
  items: list


def read_users(path: str) -> list:
  """`uid item item ...` lines (original ids, oldest first) -> [UserLine].

  Blank lines are skipped; a line with no item, a user on two lines or a
  file with no user is a RecommendError naming the file and line.
  """
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    raise RecommendError(f"users file {path!r} not found") from None
  except IsADirectoryError:
    raise RecommendError(f"users file {path!r} is a directory") from None
  except UnicodeDecodeError as e:
    raise RecommendError(f"users file {path!r} is not UTF-8 text ({e.reason} "
                         f"at byte {e.start})") from None
  out, seen = [], {}
  for lineno, line in enumerate(lines, 1):
    tokens = line.split()
    if not tokens:
      continue
    if len(tokens) < 2:
      raise RecommendError(
          f"{path}:{lineno}: expected 'user item1 item2 ...', got "
          f"{line.strip()[:80]!r} (a user with no items)")
    if tokens[0] in seen:
      raise RecommendError(f"{path}:{lineno}: user {tokens[0]} is also on "
                           f"line {seen[tokens[0]]}")
    seen[tokens[0]] = lineno
    out.append(UserLine(lineno, _id_token(tokens[0]), tokens[1:]))
  if not out:
    raise RecommendError(f"users file {path!r} has no user lines")
  return out


class Mapped(NamedTuple):
  """Histories in internal ids, from original ids (`map_histories`)."""
  histories: list    # [U] int32 arrays of internal ids
  unknown: list      # [U] lists of the tokens that are not items of the run
  num_unknown: int   # total unknown tokens, skipped
  message: str       # one line describing them ('' when there are none)


def map_histories(users: Sequence[UserLine], item_ids: Sequence,
                  source: str = "users") -> Mapped:
  """Maps original item ids to 1..N; unknown ones are skipped and counted.

  A token matches an item whose id has the same text (`"123"` matches the
  integer id 123 and the string id "123"); an integer token also matches
  its canonical form (`"007"` -> 7). Nothing else is guessed.
  """
  index = {}
  for i, x in enumerate(item_ids, 1):
    index.setdefault(str(_plain(x)), i)
  hist, unknown = [], []
  first = None
  for u in users:
    mapped, miss = [], []
    for tok in u.items:
      j = index.get(tok)
      if j is None and _INT.match(tok):
        j = index.get(str(int(tok)))
      if j is None:
        miss.append(_id_token(tok))
        if first is None:
          first = (u.lineno, tok)
      else:
        mapped.append(j)
    hist.append(np.asarray(mapped, np.int32))
    unknown.append(miss)
  n = sum(len(m) for m in unknown)
  message = ""
  if n:
    m = sum(1 for x in unknown if x)
    message = (f"{source}: skipped {n} unknown item id(s) in {m} user(s) "
               f"(not among the run's {len(item_ids)} items); first: line "
               f"{first[0]}, item {first[1]!r}")
  return Mapped(hist, unknown, n, message)


def to_original(ids: np.ndarray, scores: np.ndarray, item_ids: Sequence):
  """One user's ([original ids], [scores]); padding slots (id 0) dropped."""
  keep = ids > 0
  return ([_plain(item_ids[i - 1]) for i in ids[keep]],
          [float(f"{s:.7g}") for s in scores[keep]])


# ----------------------------------------------------------------------------
# The command.
# ----------------------------------------------------------------------------


def _tuples(x):
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_tuples(v) for v in x)
  return x


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """A run's resolved `<workdir>/config.json` (JSON lists back to tuples)."""
  if not os.path.isdir(workdir):
    raise RecommendError(f"workdir {workdir!r} not found")
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise RecommendError(f"{path} not found: {workdir!r} is not the workdir "
                         "of a training run")
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(_tuples(json.load(f)))
  except json.JSONDecodeError as e:
    raise RecommendError(f"{path} is not valid JSON: {e}") from None


def _trained_phases(workdir: str) -> list:
  out = []
  if os.path.isdir(workdir):
    for name in sorted(os.listdir(workdir)):
      sel = os.path.join(workdir, name, "best.json")
      try:
        with open(sel) as f:
          if json.load(f).get("epoch", -1) >= 0:
            out.append(name)
      except (OSError, ValueError):
        pass
  return out


def phase_dir(config, workdir: str, phase: str) -> str:
  """The run directory holding `<phase>/best`: the workdir, or for
  'pretrain' of a run that reused another's phase 1, train.pretrain_dir."""
  if not phase or "/" in phase or phase in (".", ".."):
    raise RecommendError(f"--phase must be a phase name, got {phase!r}")
  candidates = [workdir]
  pre = config.get("train", {}).get("pretrain_dir", "")
  if phase == "pretrain" and pre:
    candidates.append(pre)
  for d in candidates:
    if phase in _trained_phases(d):
      return d
  trained = _trained_phases(workdir)
  raise RecommendError(
      f"phase {phase!r} is not trained in {workdir} (no "
      f"{os.path.join(workdir, phase, 'best.json')} with a selected epoch); "
      f"trained phases: {', '.join(trained) if trained else 'none'}")


# Keys of a workdir's results.json that are not phases.
_NOT_PHASES = ("data", "popularity/valid")


def default_phase(config, workdir: str) -> tuple[str, str]:
  """(phase, why): the phase `--phase` defaults to, and a few words on why.

  The phase-2 method trained last: the last one in `<workdir>/results.json`,
  which records each phase as it finishes (with
  `--config.adv.method=none,global,cas`, cas). A run without a finished
  phase 2 gives phase 1 ('pretrain'). The order of results.json is used
  rather than file times, which a copy of the workdir does not keep.
  """
  trained = set(_trained_phases(workdir))
  results = checkpoints.read_json(os.path.join(workdir, "results.json"), {})
  finished = [name for name in results if name not in _NOT_PHASES and
              name != checkpoints.PRETRAIN and name in trained]
  if finished:
    return finished[-1], "the phase-2 method trained last"
  try:
    phase_dir(config, workdir, checkpoints.PRETRAIN)
  except RecommendError:
    raise RecommendError(
        f"nothing is trained in {workdir} yet (no phase with a selected "
        "checkpoint)") from None
  return checkpoints.PRETRAIN, "phase 1: no phase-2 method has finished"


def recommend_run(workdir: str, phase: str | None, k: int, out: str,
                  users: str | None = None, exclude_history: bool = True,
                  batch_size: int = 256, item_chunk: int | None = None,
                  shard_items: bool | None = None, devices: int = 1,
                  log=print) -> dict:
  """What the command does; returns a summary dict.

  Args:
    workdir, phase: a finished run and one of its phases ('pretrain',
      'cas', ...); None: `default_phase`. The first line logged names it.
    out: the JSON-lines file to write ('-': stdout).
    users: a file of `uid item ...` lines in original ids (None: every user
      of the run's data, with their whole sequence).
    item_chunk, shard_items: as in `top_k`; None takes the run's
      eval.item_chunk / eval.shard_items.
    devices: devices of the mesh (0 = all visible; 1 = no mesh).
    log: where the warning and summary lines go.
  """
  if k < 1:
    raise RecommendError(f"--k must be >= 1, got {k}")
  config = load_run_config(workdir)
  why = ""
  if phase is None:
    phase, why = default_phase(config, workdir)
  run_dir = phase_dir(config, workdir, phase)
  # Said first, once the inputs below are read (a mistake is one line).
  chosen = (f"phase {phase!r} of {workdir}" +
            (f" ({why}; --phase picks another)" if why else ""))
  mapped = None
  if users is not None:
    user_lines = read_users(users)
    try:
      item_ids = read_item_ids(workdir)
    except FileNotFoundError:
      item_ids = _item_ids_from_data(config, workdir)
    mapped = map_histories(user_lines, item_ids, source=users)
    log(f"recommending from {chosen}")
    if mapped.message:
      log(f"warning: {mapped.message}")
    histories = mapped.histories
    user_ids = [u.user for u in user_lines]
  else:
    ds = _load_data(config)
    item_ids = ds.item_ids
    stored = _stored_item_ids(workdir)
    if stored is not None and [_plain(x) for x in stored] != [
        _plain(x) for x in item_ids]:
      raise RecommendError(
          f"the data now read from {config.data.get('path') or 'the config'}"
          f" does not match {os.path.join(workdir, ITEM_IDS)} (the data the "
          "run was trained on changed)")
    histories = ds.sequences
    user_ids = ds.user_ids
    log(f"recommending from {chosen}")
  from cat_jax import train  # heavy: imported once the inputs are checked
  N = len(item_ids)
  try:
    model, params = train.selected_params(config, run_dir, phase, N)
  except FileNotFoundError as e:
    raise RecommendError(str(e)) from None
  mesh = sharding.make_mesh(devices) if devices != 1 else None
  if mesh is not None and mesh.size == 1:
    mesh = None
  if item_chunk is None:
    item_chunk = int(config.eval.get("item_chunk", 0))
  if shard_items is None:
    shard_items = bool(config.eval.get("shard_items", False))
  shard_items = shard_items and mesh is not None
  with train.matmul_precision(config):
    ids, scores = top_k(model, params, histories, k, exclude_history,
                        batch_size=batch_size, item_chunk=item_chunk,
                        mesh=mesh, shard_items=shard_items)
  n_short = int(np.sum(ids[:, -1] == 0)) if len(ids) else 0
  if is_chief():
    _write_lines(out, user_ids, ids, scores, item_ids,
                 mapped.unknown if mapped else None)
  summary = {"users": len(user_ids), "k": k, "phase": phase, "out": out,
             "items": N, "fewer_than_k": n_short}
  if mapped is not None:
    summary["unknown_items"] = mapped.num_unknown
    summary["users_with_unknown"] = sum(1 for x in mapped.unknown if x)
  return summary


def _load_data(config):
  try:
    return poisoning.load_from_config(config.data)
  except data_lib.DataError as e:
    raise RecommendError(f"cannot read the run's data: {e}") from None


def _stored_item_ids(workdir):
  try:
    return read_item_ids(workdir)
  except FileNotFoundError:
    return None


def _item_ids_from_data(config, workdir):
  try:
    return poisoning.load_from_config(config.data).item_ids
  except data_lib.DataError as e:
    raise RecommendError(
        f"{os.path.join(workdir, ITEM_IDS)} not found, and the run's data "
        f"cannot be read to map the ids instead: {e}") from None


def _write_lines(out, user_ids, ids, scores, item_ids, unknown):
  def lines():
    for u, uid in enumerate(user_ids):
      items, s = to_original(ids[u], scores[u], item_ids)
      rec = {"user": _plain(uid), "items": items, "scores": s}
      if unknown is not None:
        rec["unknown"] = unknown[u]
      yield json.dumps(rec) + "\n"

  if out == "-":
    sys.stdout.writelines(lines())
    sys.stdout.flush()
    return
  d = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(d):
    raise RecommendError(f"the folder of --out={out!r} does not exist")
  tmp = out + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(lines())
  os.replace(tmp, out)


# Exit codes, as launch.py's: bad input, and a command line that does not
# parse.
BAD_INPUT, USAGE = 1, 2


def _fail(message: str, code: int):
  print(f"recommend: error: {' '.join(str(message).split())}",
        file=sys.stderr)
  sys.exit(code)


def parse_flags(argv):
  """absl's flag parsing with one line per mistake, and --help exiting 0."""
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except SystemExit:
    # absl's help flags print the usage, then exit 1.
    sys.exit(0)
  except flags.Error as e:
    _fail(str(e).splitlines()[0], USAGE)


def main(argv):
  from absl import flags
  from cat_jax import writer
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}", USAGE)
  writer.quiet_library_logs()
  from cat_jax import compilation
  compilation.setup_cache()
  F = flags.FLAGS
  try:
    summary = recommend_run(
        F.workdir, F.phase, F.k, F.out, users=F.users,
        exclude_history=F.exclude_history, batch_size=F.batch_size,
        item_chunk=F.item_chunk if F.item_chunk >= 0 else None,
        shard_items=F.shard_items, devices=F.devices,
        log=lambda m: print(m, file=sys.stderr))
  except (RecommendError, data_lib.DataError, FileNotFoundError,
          ValueError, OSError) as e:
    _fail(str(e), BAD_INPUT)
  print(json.dumps(summary), file=sys.stderr)


def define_flags():
  """Command-line flags (not defined on import)."""
  from absl import flags
  flags.DEFINE_string("workdir", None, "Workdir of a finished run.",
                      required=True)
  flags.DEFINE_string("phase", None, "Phase whose selected checkpoint "
                      "recommends: pretrain, cas, none, ... (default: the "
                      "phase-2 method trained last, i.e. the last one in "
                      "<workdir>/results.json, which lists the phases in the "
                      "order they finished; 'pretrain' when none has; the "
                      "first line printed names the phase).")
  flags.DEFINE_integer("k", 20, "Items per user.")
  flags.DEFINE_string("users", None, "File of 'uid item item ...' lines in "
                      "original ids (default: every user of the run's data, "
                      "whole sequence).")
  flags.DEFINE_string("out", "-", "Output JSON-lines file ('-': stdout).")
  flags.DEFINE_bool("exclude_history", True, "Never recommend an item of "
                    "the user's history.")
  flags.DEFINE_integer("batch_size", 256, "Users per device call.")
  flags.DEFINE_integer("item_chunk", -1, "Score this many items at a time "
                       "(0: all at once; -1: the run's eval.item_chunk).")
  flags.DEFINE_bool("shard_items", None, "Split the catalog across the "
                    "devices (default: the run's eval.shard_items).")
  flags.DEFINE_integer("devices", 1, "Devices to use (0: all visible).")


if __name__ == "__main__":
  from absl import app
  define_flags()
  app.run(main, flags_parser=parse_flags)
