import os

import numpy as np
import pytest

from cat_jax import data


def write(tmp_path, name, text):
  p = tmp_path / name
  p.write_text(text)
  return str(p)


def test_user_lines_reader_and_identity_remap(tmp_path):
  path = write(tmp_path, "u.txt", "1 1 2 3\n2 4 2 5\n\n3 1 5\n")
  ds = data.load_dataset(path)
  assert ds.num_users == 3 and ds.num_items == 5
  assert [s.tolist() for s in ds.sequences] == [[1, 2, 3], [4, 2, 5], [1, 5]]
  assert ds.user_ids == [1, 2, 3]


def test_interactions_reader_groups_in_file_order(tmp_path):
  path = write(tmp_path, "i.txt", "7 30\n8 10\n7 10\n8 20\n7 20\n")
  ds = data.load_dataset(path, "interactions")
  # Items are numbered by first appearance: 30->1, 10->2, 20->3.
  assert [s.tolist() for s in ds.sequences] == [[1, 2, 3], [2, 3]]
  assert ds.item_ids == [30, 10, 20]
  assert data.guess_format(path) == "interactions"


def test_movielens_reader_sorts_by_time_stably(tmp_path):
  text = "1::10::5::300\n1::11::3::100\n1::12::4::100\n2::10::1::5\n"
  path = write(tmp_path, "ratings.dat", text)
  ds = data.load_dataset(path)
  # Items 11 and 12 tie at t=100 and keep their file order.
  assert [ds.item_ids[i - 1] for i in ds.sequences[0]] == [11, 12, 10]
  assert [ds.item_ids[i - 1] for i in ds.sequences[1]] == [10]


def test_csv_reader_string_ids_header_and_time_order(tmp_path):
  text = ("user,item,rating,timestamp\nA1,B9,5.0,20\nA1,B7,4.0,10\n"
          "A2,B9,1.0,5\n")
  path = write(tmp_path, "ratings.csv", text)
  ds = data.load_dataset(path)
  assert ds.user_ids == ["A1", "A2"]
  assert [[ds.item_ids[i - 1] for i in s] for s in ds.sequences] == [
      ["B7", "B9"], ["B9"]]


@pytest.mark.parametrize("fmt,text,needle", [
    ("user_lines", "1 2 3\n2 x 4\n", ":2: item id 'x' is not an integer"),
    ("user_lines", "1 2 3\n2\n", ":2: expected 'user item1"),
    ("user_lines", "1 2 3\n1 4 5\n", "user 1 appears on two lines"),
    ("interactions", "1 2\n1 2 3\n", ":2: expected 2 columns"),
    ("interactions", "1 2\n-1 2\n", "user id -1 is negative"),
    ("movielens", "1::2::3::4\n1::2::3\n", ":2: expected 4 fields"),
    ("movielens", "1::2::3::x\n", ":1: timestamp 'x'"),
    ("csv", "a,b,1,2\na,b,1\n", ":2: expected 4 columns"),
    ("csv", "a,b,1,2\na,b,1,later\n", ":2: timestamp 'later'"),
])
def test_malformed_lines_name_file_and_line(tmp_path, fmt, text, needle):
  path = write(tmp_path, "bad", text)
  with pytest.raises(data.DataError) as e:
    data.load_dataset(path, fmt)
  assert needle in str(e.value)
  assert path in str(e.value)


def test_missing_empty_and_unknown(tmp_path):
  with pytest.raises(data.DataError, match="not found.*S3-Rec"):
    data.load_dataset(str(tmp_path / "nope.txt"))
  with pytest.raises(data.DataError, match="No data path"):
    data.load_dataset("")
  with pytest.raises(data.DataError, match="is empty"):
    data.load_dataset(write(tmp_path, "e.txt", "\n\n"))
  with pytest.raises(data.DataError, match="Unknown data format"):
    data.load_dataset(write(tmp_path, "x.txt", "1 2\n"), "parquet")
  with pytest.raises(data.DataError, match="directory"):
    data.load_dataset(str(tmp_path))


def test_kcore_filter_is_iterative():
  raw = {1: [1, 2, 3], 2: [1, 2, 3], 3: [1, 4]}
  # k=2: item 4 goes (1 use), then user 3 has 1 item and goes; then item 1..3
  # still have 2 uses each.
  assert data.kcore_filter(raw, 2) == {1: [1, 2, 3], 2: [1, 2, 3]}
  assert data.kcore_filter(raw, 3) == {}
  assert data.kcore_filter(raw, 0) is raw


def test_split_and_left_pad():
  tr, v, te = data.split(np.array([5, 6, 7, 8]))
  assert tr.tolist() == [5, 6] and (v, te) == (7, 8)
  tr, v, te = data.split(np.array([5, 6]))
  assert tr.tolist() == [5, 6] and (v, te) == (0, 0)
  assert data.left_pad([1, 2, 3], 5).tolist() == [0, 0, 1, 2, 3]
  assert data.left_pad([1, 2, 3, 4, 5, 6], 4).tolist() == [3, 4, 5, 6]


def test_build_arrays_windows_history_and_eval():
  seqs = [np.array(s, np.int32) for s in
          ([1, 2, 3, 4, 5, 6, 7], [3, 1], [8, 9, 2, 4])]
  ds = data.Dataset(sequences=seqs, num_items=9, user_ids=[0, 1, 2],
                    item_ids=list(range(1, 10)))
  a = data.build_arrays(ds, max_len=3)
  # User 0: train = 1..5; window = last 4 = [2,3,4,5].
  assert a.train_inputs[0].tolist() == [2, 3, 4]
  assert a.train_targets[0].tolist() == [3, 4, 5]
  # User 1 is training-only (2 items).
  assert a.train_inputs[1].tolist() == [0, 0, 3]
  assert a.train_targets[1].tolist() == [0, 0, 1]
  # User 2: train = [8, 9].
  assert a.train_inputs[2].tolist() == [0, 0, 8]
  assert a.train_targets[2].tolist() == [0, 0, 9]
  # Histories are the whole training part, sorted, padded with N+1 = 10.
  assert a.history.shape == (3, 5)
  assert a.history[0].tolist() == [1, 2, 3, 4, 5]
  assert a.history[1].tolist() == [1, 3, 10, 10, 10]
  assert a.eval_users.tolist() == [0, 2]
  assert a.valid_inputs.tolist() == [[3, 4, 5], [0, 8, 9]]
  assert a.valid_targets.tolist() == [6, 2]
  assert a.test_inputs.tolist() == [[4, 5, 6], [8, 9, 2]]
  assert a.test_targets.tolist() == [7, 4]


def test_train_only_users_after_the_real_ones():
  """Dataset(num_real_users=k): users k.. are training data as a whole."""
  seqs = [np.array(s, np.int32) for s in
          ([1, 2, 3, 4, 5], [3, 1, 4], [6, 7, 8, 9], [2, 5])]
  ds = data.Dataset(sequences=seqs, num_items=9, user_ids=[0, 1, "f0", "f1"],
                    item_ids=list(range(1, 10)), num_real_users=2)
  assert (ds.num_users, ds.num_real_users, ds.num_fake_users) == (4, 2, 2)
  assert [ds.is_real(u) for u in range(4)] == [True, True, False, False]
  tr, v, te = data.split(ds.sequences[2])
  assert tr.tolist() == [6, 7, 8, 9] and (v, te) == (0, 0)
  assert type(tr) is np.ndarray  # only the stored sequence is marked
  a = data.build_arrays(ds, max_len=3)
  assert a.eval_users.tolist() == [0, 1]
  assert a.train_users.tolist() == [0, 2, 3]  # user 1 has one training item
  assert a.train_inputs[2].tolist() == [6, 7, 8]
  assert a.train_targets[2].tolist() == [7, 8, 9]
  assert a.history[2].tolist() == [6, 7, 8, 9]
  assert a.train_inputs[3].tolist() == [0, 0, 2]
  # The real users' tables are those of the real users alone.
  real = data.Dataset(sequences=seqs[:2], num_items=9, user_ids=[0, 1],
                      item_ids=list(range(1, 10)))
  b = data.build_arrays(real, max_len=3)
  for name in ("eval_users", "valid_inputs", "valid_targets", "test_inputs",
               "test_targets"):
    assert getattr(a, name).tolist() == getattr(b, name).tolist()
  assert data.describe(ds) == {**data.describe(real), "fake_users": 2,
                               "fake_interactions": 6}
  assert real.num_real_users == 2 and "fake_users" not in data.describe(real)
  # Whole sequence = training items: a train-only user with every item is
  # refused like a real one.
  with pytest.raises(data.DataError, match="every item"):
    data.build_arrays(data.Dataset(
        sequences=[np.array([2, 1, 3]), np.array([1, 2, 3])], num_items=3,
        user_ids=[0, 1], item_ids=[1, 2, 3], num_real_users=1), 2)


def test_user_with_every_item_is_refused():
  ds = data.Dataset(sequences=[np.array([1, 2, 3, 1, 2])], num_items=3,
                    user_ids=[0], item_ids=[1, 2, 3])
  with pytest.raises(data.DataError, match="every item"):
    data.build_arrays(ds, 4)


def test_synthetic_is_deterministic_and_sequential():
  a = data.synthetic_dataset(num_users=300, num_items=100, num_clusters=5,
                             seed=3)
  b = data.synthetic_dataset(num_users=300, num_items=100, num_clusters=5,
                             seed=3)
  c = data.synthetic_dataset(num_users=300, num_items=100, num_clusters=5,
                             seed=4)
  assert all(np.array_equal(x, y) for x, y in zip(a.sequences, b.sequences))
  assert not all(np.array_equal(x, y)
                 for x, y in zip(a.sequences, c.sequences))
  assert all(len(set(s.tolist())) == len(s) for s in a.sequences)
  assert all(len(s) >= 5 for s in a.sequences)
  # Sequential structure: the most frequent successor of an item explains
  # far more transitions than chance (1/100).
  pairs = {}
  for s in a.sequences:
    for x, y in zip(s[:-1], s[1:]):
      pairs.setdefault(int(x), []).append(int(y))
  top = sum(max(np.bincount(v)) for v in pairs.values())
  total = sum(len(v) for v in pairs.values())
  assert top / total > 0.3


def _synthetic_with_choice(num_users, num_items, num_clusters, mean_length,
                           p_next, p_stay, seed, min_length=5, zipf=1.1):
  """The generator's walk written with `rng.choice(a, p=p)`, as it was before
  its draws were made fast: the same random numbers must give the same data."""
  rng = np.random.default_rng(seed)
  pop = 1.0 / np.arange(1, num_items + 1) ** zipf
  pop = pop[rng.permutation(num_items)]
  pop /= pop.sum()
  cluster = rng.integers(0, num_clusters, size=num_items)
  cluster[:num_clusters] = np.arange(num_clusters)
  members = [np.flatnonzero(cluster == c) for c in range(num_clusters)]
  successor = np.empty(num_items, dtype=np.int64)
  for m in members:
    order = rng.permutation(m)
    successor[order] = np.roll(order, -1)
  lengths = np.maximum(min_length, rng.poisson(mean_length, size=num_users))
  lengths = np.minimum(lengths, num_items // 2)
  out = []
  for length in lengths:
    seq, cur = [], rng.choice(num_items, p=pop)
    for _ in range(length):
      for _ in range(20):
        if cur not in seq:
          break
        cur = rng.choice(num_items, p=pop)
      if cur in seq:
        break
      seq.append(cur)
      u = rng.random()
      if u < p_next:
        cur = successor[cur]
      elif u < p_next + p_stay:
        m = members[cluster[cur]]
        cur = rng.choice(m, p=pop[m] / pop[m].sum())
      else:
        cur = rng.choice(num_items, p=pop)
    out.append(seq)
  return out


@pytest.mark.parametrize("kw", [
    dict(num_users=200, num_items=300, num_clusters=6, mean_length=7,
         p_next=0.05, p_stay=0.6, seed=2),  # the demo's kind of data
    dict(num_users=200, num_items=80, num_clusters=4, mean_length=20,
         p_next=0.6, p_stay=0.3, seed=5)])  # long walks: many repeats
def test_synthetic_draws_as_rng_choice_would(kw):
  ds = data.synthetic_dataset(**kw)
  ref = _synthetic_with_choice(**kw)
  # `remap` renumbers items by first appearance; compare through its ids.
  got = [[ds.item_ids[i - 1] - 1 for i in s] for s in ds.sequences]
  assert got == [list(map(int, s)) for s in ref]


def test_resolve_path_uses_cat_data_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("CAT_DATA_DIR", str(tmp_path))
  assert data.resolve_path("Video.txt") == os.path.join(str(tmp_path),
                                                        "Video.txt")
  assert data.resolve_path("/abs/x.txt") == "/abs/x.txt"


def test_shared_video_file_matches_table_1():
  from conftest import SHARED_DATA
  # $CAT_DATA_DIR first (a clone elsewhere), then ../shared/data.
  dirs = [d for d in (os.environ.get("CAT_DATA_DIR"), SHARED_DATA) if d]
  paths = [os.path.join(d, "Video.txt") for d in dirs]
  path = next((p for p in paths if os.path.exists(p)), None)
  if path is None:
    pytest.skip(f"Video.txt is in none of {dirs}")
  stats = data.describe(data.load_dataset(path))
  assert (stats["users"], stats["items"], stats["interactions"]) == (
      24303, 10672, 231780)
