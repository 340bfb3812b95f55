"""Data file readers: each format to an ordered {user: [item, ...]} dict.

Every reader returns raw ids in each user's time order; `cat_jax.data`
filters, remaps and splits them. A missing, empty or malformed file raises
`DataError` with a message that names the file, the line and what to do.
"""

from __future__ import annotations

import csv
import os

FORMATS = ("user_lines", "interactions", "movielens", "csv")

DATA_HINT = (
    "The Amazon Beauty and Video Games 5-core files (per-user lines) are in the "
    "S3-Rec/ICLRec repositories (data/Beauty.txt, data/Video_Games.txt); the "
    "SASRec-format ML-1M file is kang205/SASRec data/ml-1m.txt and the raw "
    "MovieLens ratings.dat is at grouplens.org. Pass the file with "
    "--config.data.path=/path/to/file or put it in $CAT_DATA_DIR."
)


class DataError(ValueError):
  """A data file is missing or malformed; the message names file and line."""


def _open_lines(path: str):
  if not path:
    raise DataError(f"No data path given. {DATA_HINT}")
  if not os.path.exists(path):
    raise DataError(f"Data file not found: {path!r}. {DATA_HINT}")
  if os.path.isdir(path):
    raise DataError(f"Data path {path!r} is a directory; pass the file itself.")
  with open(path, "r", encoding="utf-8", errors="replace") as f:
    lines = f.read().splitlines()
  if not any(line.strip() for line in lines):
    raise DataError(f"Data file {path!r} is empty.")
  return lines


def _int(token: str, path: str, lineno: int, what: str) -> int:
  try:
    value = int(token)
  except ValueError:
    raise DataError(
        f"{path}:{lineno}: {what} {token!r} is not an integer.") from None
  if value < 0:
    raise DataError(f"{path}:{lineno}: {what} {value} is negative.")
  return value


def read_user_lines(path: str) -> dict:
  """Reads `uid i1 i2 ...` lines (items in time order), as in ../shared/data."""
  out = {}
  for lineno, line in enumerate(_open_lines(path), 1):
    tokens = line.split()
    if not tokens:
      continue
    if len(tokens) < 2:
      raise DataError(
          f"{path}:{lineno}: expected 'user item1 item2 ...', got {line!r} "
          "(a user with no items).")
    uid = _int(tokens[0], path, lineno, "user id")
    if uid in out:
      raise DataError(f"{path}:{lineno}: user {uid} appears on two lines.")
    out[uid] = [_int(t, path, lineno, "item id") for t in tokens[1:]]
  return out


def read_interactions(path: str) -> dict:
  """Reads `uid iid` lines in time order (the SASRec repository's format)."""
  out = {}
  for lineno, line in enumerate(_open_lines(path), 1):
    tokens = line.split()
    if not tokens:
      continue
    if len(tokens) != 2:
      raise DataError(
          f"{path}:{lineno}: expected 2 columns 'user item', got "
          f"{len(tokens)}: {line!r}.")
    uid = _int(tokens[0], path, lineno, "user id")
    out.setdefault(uid, []).append(_int(tokens[1], path, lineno, "item id"))
  return out


def read_movielens(path: str) -> dict:
  """Reads MovieLens `uid::iid::rating::timestamp`, each user's items by time.

  The sort is stable, so interactions with equal timestamps keep file order.
  """
  rows = {}
  for lineno, line in enumerate(_open_lines(path), 1):
    if not line.strip():
      continue
    tokens = line.split("::")
    if len(tokens) != 4:
      raise DataError(
          f"{path}:{lineno}: expected 4 fields 'user::item::rating::timestamp',"
          f" got {len(tokens)}: {line!r}.")
    uid = _int(tokens[0], path, lineno, "user id")
    iid = _int(tokens[1], path, lineno, "item id")
    ts = _int(tokens[3].strip(), path, lineno, "timestamp")
    rows.setdefault(uid, []).append((ts, iid))
  return {u: [i for _, i in sorted(r, key=lambda x: x[0])]
          for u, r in rows.items()}


def read_csv(path: str) -> dict:
  """Reads `user,item,rating,timestamp` (Amazon ratings-only files).

  Users and items may be arbitrary strings; each user's items are sorted by
  timestamp (stable). A first line whose timestamp is not a number is taken as
  a header.
  """
  lines = _open_lines(path)
  rows = {}
  for lineno, fields in enumerate(csv.reader(lines), 1):
    if not fields or not "".join(fields).strip():
      continue
    if len(fields) != 4:
      raise DataError(
          f"{path}:{lineno}: expected 4 columns 'user,item,rating,timestamp',"
          f" got {len(fields)}: {','.join(fields)!r}.")
    user, item, _, ts = (f.strip() for f in fields)
    try:
      t = float(ts)
    except ValueError:
      if lineno == 1:
        continue  # header
      raise DataError(
          f"{path}:{lineno}: timestamp {ts!r} is not a number.") from None
    if not user or not item:
      raise DataError(f"{path}:{lineno}: empty user or item id.")
    rows.setdefault(user, []).append((t, item))
  return {u: [i for _, i in sorted(r, key=lambda x: x[0])]
          for u, r in rows.items()}


READERS = {
    "user_lines": read_user_lines,
    "interactions": read_interactions,
    "movielens": read_movielens,
    "csv": read_csv,
}


def guess_format(path: str) -> str:
  """Guesses the format from the name and the first non-empty line."""
  if path.endswith(".dat"):
    return "movielens"
  if path.endswith(".csv"):
    return "csv"
  for line in _open_lines(path):
    if line.strip():
      if "::" in line:
        return "movielens"
      if "," in line:
        return "csv"
      return "interactions" if len(line.split()) == 2 else "user_lines"
  raise AssertionError("unreachable: _open_lines rejects empty files")
