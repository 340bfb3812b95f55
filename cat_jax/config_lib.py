"""The one place where every knob gets its default, plus `parse_arg`.

`configs/*.py` start from `base_config()` and change what their data set and
model need; any field can still be overridden as `--config.train.epochs=5`.
`describe` lists every field with its value and the comment above it here
(`launch.py --show_config`); `command_line_error` turns a mistyped config
file, field or argument into one line with the closest valid name.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import os
import re

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Paper settings (Tan et al., Sec. 5.3) on the synthetic data set."""
  c = ml_collections.ConfigDict()
  # Seed for parameter init, data order, negatives, dropout and perturbations.
  c.seed = 0
  # Persistent XLA compilation cache: 'auto' ($CAT_COMPILATION_CACHE, else
  # ~/.cache/cat_jax/xla), 'off', or a folder (cat_jax/compilation.py).
  c.compilation_cache = "auto"

  c.data = ml_collections.ConfigDict()
  # 'synthetic' (built in, no download) or 'file' (read data.path).
  c.data.name = "synthetic"
  # Data file; relative paths are also looked up in $CAT_DATA_DIR.
  c.data.path = ""
  # 'auto', 'user_lines', 'interactions', 'movielens' or 'csv'.
  c.data.format = "auto"
  # k-core filter (users and items with >= k interactions); 0 = off.
  c.data.kcore = 0
  # T: length of the left-padded input window (paper: 50 Amazon, 200 ML-1M).
  c.data.max_len = 50
  c.data.synthetic = ml_collections.ConfigDict()
  # Size of the synthetic Markov-chain data set (see data.synthetic_dataset).
  c.data.synthetic.num_users = 2000
  c.data.synthetic.num_items = 500
  c.data.synthetic.num_clusters = 20
  c.data.synthetic.mean_length = 20.0
  # Chance of moving to the next item of the chain / to an item of the same
  # cluster; the rest is a jump to a popular item anywhere.
  c.data.synthetic.p_next = 0.6
  c.data.synthetic.p_stay = 0.3
  # Zipf exponent of item popularity.
  c.data.synthetic.zipf = 1.1
  # Seed of the generator (independent of the training seed).
  c.data.synthetic.seed = 0
  c.data.poison = ml_collections.ConfigDict()
  # Fake users added to training only (poisoning.py): none, random, bandwagon.
  c.data.poison.attack = "none"
  # Number of fake users as a share of the real users (0.01 = 1%).
  c.data.poison.share = 0.01
  # Target items, drawn uniformly among the less popular half of the items.
  c.data.poison.num_targets = 5
  # Filler items before each occurrence of the target in a fake sequence.
  c.data.poison.filler_len = 4
  # Blocks (filler_len fillers, then the target) in each fake sequence.
  c.data.poison.repeats = 3
  # Bandwagon fillers come from this share of the most popular items.
  c.data.poison.popular_share = 0.05
  # Seed of the targets and fake users (independent of the training seed).
  c.data.poison.seed = 0

  c.model = ml_collections.ConfigDict()
  # 'sasrec' or 'gru4rec'.
  c.model.name = "sasrec"
  # Embedding / hidden size d.
  c.model.hidden = 100
  # SASRec self-attention blocks and heads (unused by GRU4Rec).
  c.model.num_blocks = 2
  c.model.num_heads = 1
  # Dropout rate on embeddings, attention and feed-forward layers.
  c.model.dropout = 0.2
  # Compute dtype of the encoder layers: 'float32' or 'bfloat16' (params,
  # embeddings, losses, perturbations and ranking scores stay float32).
  c.model.dtype = "float32"

  c.train = ml_collections.ConfigDict()
  # Phase 1: epochs of base training (paper: 500).
  c.train.epochs = 500
  # Users per step; one sampled negative per position.
  c.train.batch_size = 128
  # Adam learning rate and betas.
  c.train.lr = 1e-3
  c.train.b1 = 0.9
  c.train.b2 = 0.98
  # L2 regularization coefficient (added to the gradient, as torch's Adam).
  c.train.l2 = 1e-5
  # Evaluate on validation (and save the latest checkpoint) every N epochs.
  c.train.eval_every = 20
  # Print a progress line every N epochs.
  c.train.log_every = 1
  # While a first epoch or validation compiles, print a line every N seconds
  # (so a long compilation is not a silence); 0 = off.
  c.train.heartbeat_s = 10.0
  # Precision of float32 matrix products (jax.default_matmul_precision):
  # 'default' (the backend's: TF32 on NVIDIA A100/H100, fp32 on CPU),
  # 'float32', 'tensorfloat32' or 'bfloat16'.
  c.train.matmul_precision = "default"
  # Reuse the pretrained phase-1 state from another workdir ('' = this one).
  c.train.pretrain_dir = ""
  # Early stopping: stop phase 1 after this many evaluations without a better
  # validation metric (0 = off: train all train.epochs, as the paper).
  c.train.patience = 0
  # Length buckets: group users by the real length of their window and run
  # each batch on its bucket's length only (same result per sequence, less
  # padding). Number of buckets chosen from the data (1 = off).
  c.train.buckets = 1
  # Explicit bucket lengths (increasing, <= data.max_len) instead; () = choose.
  c.train.bucket_lengths = ()
  # Seed of the order in which the buckets' batches take turns (shared by the
  # seeds of a vectorized group; users within buckets follow `seed`).
  c.train.order_seed = 0
  # How training windows become batches: 'buckets' (left-padded windows,
  # length buckets above) or 'packed' (several users' items side by side in
  # rows of data.max_len, with attention, positions and the GRU state kept
  # per sequence: one shape, so the epoch compiles once, not per bucket;
  # `packing`). 'packed' ignores train.buckets and train.bucket_lengths.
  c.train.layout = "buckets"
  # Rows per step with layout 'packed' (0 = as many as hold train.batch_size
  # users on average).
  c.train.pack_rows = 0

  c.adv = ml_collections.ConfigDict()
  # Phase 2 method: none, linear, seq, global, cas, cas_temporal, cas_cross;
  # several ('none,global,cas' or 'none+cas') train each from one phase 1.
  c.adv.method = "cas"
  # Phase 2: epochs trained from the phase-1 state (paper: 100; 0 = skip).
  c.adv.epochs = 100
  # Perturbation size eps (both levels, Eq. 4.7 and 4.9).
  c.adv.eps = 10.0
  # Weights of L_adv1 and L_adv2 in Eq. 4.10.
  c.adv.lambda1 = 1.0
  c.adv.lambda2 = 1.0
  # Size of the random start of the level-1 search (see adversarial.py).
  c.adv.xi = 1e-3
  # What one eps-sized perturbation covers: 'row' (each sequence at level 1,
  # each embedding at level 2) or 'batch' (the whole batch tensor).
  c.adv.scope = "row"
  # If True, eps is a fraction of the norm of what is perturbed (each S block
  # or W/E row, per adv.scope) instead of an absolute size (the paper's).
  c.adv.relative = False
  # Level-1 direction: 'input' (Eq. 4.7) or 'weighted' (see adversarial.py).
  c.adv.direction = "input"
  # Level-1 size: 'equal' (global's norm per sequence) or 'mean' (w * A).
  c.adv.budget = "equal"
  # Per-user size: 'uniform' (eps) or 'pamacf' (eps * c_u, see adversarial.py).
  c.adv.magnitude = "uniform"
  # Evaluate (and save) every N phase-2 epochs; 0 = train.eval_every.
  c.adv.eval_every = 0
  # Early stopping of phase 2 in evaluations without improvement (0 = off).
  c.adv.patience = 0
  # Phase 2 starts from phase 1's 'last' state (the paper: after its 500
  # epochs) or from its 'best' (selected on validation) checkpoint.
  c.adv.init = "last"

  c.parallel = ml_collections.ConfigDict()
  # Devices to split each batch over (data parallel); 0 = all visible.
  c.parallel.devices = 0
  # Split the user tables (windows, histories) by rows over the devices
  # instead of copying them to each; on several hosts each process then
  # builds only its devices' rows. Same results, less memory per device.
  c.parallel.shard_data = False

  c.eval = ml_collections.ConfigDict()
  # Users per evaluation batch (results do not depend on it).
  c.eval.batch_size = 256
  # Length buckets of the evaluation windows (same ranks; 1 = off).
  c.eval.buckets = 1
  # Score the catalog this many items at a time (0 = all at once); for
  # catalogs whose [batch, items] score matrix does not fit in memory.
  c.eval.item_chunk = 0
  # With item_chunk: split the catalog, not the users, across the devices
  # (each scores every user against its share of the items).
  c.eval.shard_items = False
  # Cut-offs K of NDCG@K and HR@K.
  c.eval.ks = (5, 10, 20)
  # Validation metric for model selection.
  c.eval.select = "ndcg@10"
  return c


# File name (under $CAT_DATA_DIR) and window T of the paper's data sets.
PAPER_DATASETS = {"video": ("Video.txt", 50), "beauty": ("Beauty.txt", 50),
                  "clothing": ("Clothing.txt", 50),
                  "ml1m": ("ml-1m.txt", 200)}


# eps per (model, data set) and method, chosen on seed 0's validation
# NDCG@10 (RESULTS.md, "eps grid" and "Superseded"). The paper trains with
# eps = 10 (Sec. 5.3), but here eps is the L2 norm of the perturbation of
# one sequence block or embedding row, and on Video SASRec eps = 10 costs
# 21% of test NDCG@10 even spread over the whole batch (scope 'batch'), and
# linear at eps = 1 11% (RESULTS.md, "eps grid"): pass --config.adv.eps=10
# to see it. All four come from their paper-budget grids
# (`scripts/cpu_paper.sh SETTING chosen`; GRU4Rec's seq stays within
# noise of none on validation at every eps, so its value matters little),
# except GRU4Rec's global and cas on Video: its 10-epoch grid picked 0.5,
# but repeated at the full 100-epoch phase 2, 0.3 is best on validation for
# both and gains 4-7 points more test NDCG@10 over three seeds (RESULTS.md,
# "GRU4Rec: eps chosen at the full phase-2 budget"; on Beauty the full-budget
# grid keeps 0.5).
# ML-1M and Clothing (until its grid is run, issue 32) have no grid: they
# take their model's Video values. The cascade
# ablations take `cas`'s value, so that they differ from it in one thing
# only.
TUNED_EPS = {
    ("sasrec", "video"): {"linear": 0.5, "seq": 1.0, "global": 0.1,
                          "cas": 0.1},
    ("gru4rec", "video"): {"linear": 0.5, "seq": 0.3, "global": 0.3,
                           "cas": 0.3},
    ("sasrec", "beauty"): {"linear": 0.1, "seq": 1.0, "global": 0.02,
                           "cas": 0.02},
    ("gru4rec", "beauty"): {"linear": 0.5, "seq": 0.3, "global": 0.5,
                            "cas": 0.5},
    # Clothing (issue 32): seed 0's 10-epoch grids, extended at their edges
    # (`scripts/cpu_paper.sh SETTING chosen`; RESULTS.md, "Clothing").
    ("sasrec", "clothing"): {"linear": 0.3, "seq": 0.5, "global": 0.2,
                             "cas": 0.1},
    ("gru4rec", "clothing"): {"linear": 0.5, "seq": 0.3, "global": 0.5,
                              "cas": 0.5},
}


def tuned_eps(model: str, dataset: str, method: str) -> float:
  """The validated eps of `method` for `model` on a paper data set."""
  table = TUNED_EPS.get((model, dataset)) or TUNED_EPS[(model, "video")]
  # none ignores eps; the cascade ablations take cas's value.
  return table.get(method, table["cas"])


def paper_config(model: str, dataset: str,
                 arg: str | None = None) -> ml_collections.ConfigDict:
  """Paper settings for `model` on one of PAPER_DATASETS.

  `arg` ('method=cas,eps=0.1,seed=0,path=...') comes from
  `--config=configs/<model>_<dataset>.py:ARG`; without eps, the method's
  validated value (`tuned_eps`).
  """
  path, max_len = PAPER_DATASETS[dataset]
  a = parse_arg(arg, method="cas", eps=-1.0, seed=0, path=path)
  c = base_config()
  c.seed = a.seed
  c.data.name = "file"
  c.data.path = a.path
  c.data.max_len = max_len
  c.model.name = model
  c.adv.method = a.method
  c.adv.eps = a.eps if a.eps >= 0 else tuned_eps(model, dataset, a.method)
  # Length buckets: same per-sequence results, ~6x faster epochs on the
  # Amazon data; accuracy checked in docs/results/layouts.md.
  c.train.buckets = 4
  # Except GRU4Rec's ML-1M evaluation (T = 200, 3,416 items), measured 1.4x
  # slower bucketed (benchmarks/RESULTS.md): cheap scoring, more batches.
  c.eval.buckets = 1 if (model, dataset) == ("gru4rec", "ml1m") else 4
  # SASRec on the Amazon sets trains on packed rows (`packing`): one
  # training shape, so a run starts 2x sooner on a CPU core, and its epochs
  # are 20-37% shorter (benchmarks/RESULTS.md, "Compilation"); accuracy as
  # with buckets over three seeds (docs/results/layouts.md). GRU4Rec
  # keeps buckets until a full-budget check: packed, its epochs are 4-16%
  # shorter and 100 of its 500 epochs train as well (same file). ML-1M
  # (T = 200, ~165 items a user) fits one user per row: nothing to pack.
  c.train.layout = ("packed" if model == "sasrec" and dataset != "ml1m"
                    else "buckets")
  # Phase 2 starts from phase 1's checkpoint selected on validation.
  c.adv.init = "best"
  return c


def parse_arg(arg: str | None, **spec) -> ml_collections.ConfigDict:
  """Parses 'key=value,flag,...' from `--config=file.py:ARG` (big_vision style).

  `spec` gives each allowed key with its default; the type of the default
  decides the parsing. A bare key sets a bool to True. Unknown keys raise.
  """
  out = ml_collections.ConfigDict(spec)
  if not arg:
    return out
  for item in arg.split(","):
    if not item:
      continue
    key, eq, value = item.partition("=")
    if key not in spec:
      raise ValueError(
          f"Unknown config argument {key!r}{_did_you_mean(key, spec)}; "
          f"known: {', '.join(sorted(spec))}.")
    default = spec[key]
    if not eq:
      if not isinstance(default, bool):
        raise ValueError(f"Config argument {key!r} needs a value.")
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes")
    elif default is None:
      out[key] = value
    else:
      out[key] = type(default)(value)
  return out


def _did_you_mean(name: str, options) -> str:
  close = difflib.get_close_matches(name, list(options), n=1)
  return f" (did you mean {close[0]}?)" if close else ""


def flat_fields(config, prefix: str = "") -> dict:
  """{'train.epochs': 500, ...}: every leaf of a ConfigDict, in order."""
  out = {}
  for key, value in config.items():
    name = prefix + key
    if isinstance(value, ml_collections.ConfigDict):
      out.update(flat_fields(value, name + "."))
    else:
      out[name] = value
  return out


def field_comments() -> dict:
  """{'train.epochs': 'Phase 1: epochs of base training (paper: 500).'}.

  Read from the comments above each assignment in `base_config`; a field
  written right after another without its own comment shares that one.
  """
  out, comment, last = {}, [], ""
  for line in inspect.getsource(base_config).splitlines():
    text = line.strip()
    m = re.match(r"c\.([\w.]+) = (?!ml_collections)", text)
    if text.startswith("#"):
      if last:  # a new comment starts a new group
        comment, last = [], ""
      comment.append(text.lstrip("# "))
    elif m:
      last = " ".join(comment) or last
      out[m.group(1)] = last
      comment = []
    elif not text or "ConfigDict()" in text:
      comment, last = [], ""
  return out


def describe(config) -> str:
  """Every field of `config` as 'name = value  # comment', one per line."""
  comments = field_comments()
  lines = []
  for name, value in flat_fields(config).items():
    note = comments.get(name, "")
    lines.append(f"{name} = {value!r}" + (f"  # {note}" if note else ""))
  return "\n".join(lines)


def load_config_file(spec: str):
  """The ConfigDict of 'path/to/config.py[:arg]' (as --config loads it)."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_cat_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def config_spec(argv, default: str) -> str:
  """The --config value of a command line ('file.py:arg'), or `default`."""
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a[len("--config="):]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return default


def command_line_error(error: BaseException, argv,
                       default_config: str = "") -> str:
  """One line for a config mistake on the command line.

  Args:
    error: what parsing the flags (or reading --config) raised.
    argv: the command line.
    default_config: the config file used when argv has no --config.

  Handles a missing config file (with the closest file in its folder), an
  unknown --config.<field> (with the closest field), and the errors of the
  config file's own argument parsing (`parse_arg`); anything else gives the
  innermost error's first line.
  """
  spec = config_spec(argv, default_config)
  path = spec.partition(":")[0]
  if not os.path.isfile(path):
    folder = os.path.dirname(path) or "."
    files = sorted(f for f in os.listdir(folder) if f.endswith(".py")) \
        if os.path.isdir(folder) else []
    hint = _did_you_mean(os.path.basename(path), files)
    return (f"config file not found: {path}{hint}" +
            (f"; the configs in {folder}/ are {', '.join(files)}."
             if files else "."))
  try:
    names = list(flat_fields(load_config_file(spec)))
  except Exception:  # noqa: BLE001 (the config's own error is below)
    names = list(flat_fields(base_config()))
  for a in argv:
    field = a[len("--config."):].partition("=")[0] \
        if a.startswith("--config.") else None
    if field and field not in names:
      return (f"unknown config field --config.{field}"
              f"{_did_you_mean(field, names)}; `python launch.py "
              "--show_config` lists every field.")
  chain, e = [], error
  while e is not None and e not in chain:
    chain.append(e)
    e = e.__cause__ or e.__context__
  msg = str(error)
  for x in reversed(chain):  # the innermost error says what went wrong
    text = str(x).strip()
    if text and "Traceback" not in text:
      msg = text
      break
  msg = msg.splitlines()[0]
  if len(msg) > 1 and msg[0] == msg[-1] and msg[0] in "'\"":
    msg = msg[1:-1]  # a KeyError's repr
  for a in argv:  # name the override whose value failed to parse
    name, eq, value = a.partition("=")
    if name.startswith("--config.") and eq and value and value in msg:
      return f"{a}: {msg}"
  return msg
