"""Robustness to data poisoning: clean accuracy and target promotion.

  python -m cat_jax.experiments.poisoning --config=configs/sasrec_video.py \
      --workdir=runs/poison_sasrec_video --attacks=random,bandwagon \
      --share=0.01 --methods=none,global,cas,cas_pamacf \
      --eps=global=0.1,cas=0.1 --seeds=0,1,2

For each attack and share (`data.poison`, see `cat_jax.poisoning`) the data
set is poisoned with fake users (training data only) and every method is
trained with the usual two phases, in its own sub-workdir
(<workdir>/<attack>_<share>/, the runners' layout inside: seed<k>/pretrain
and seed<k>/<variant>; its phase 1 differs from the clean one). The clean
data set (attack 'none', <workdir>/clean/) is the reference (--noclean
skips it). Each selected phase-2 checkpoint is then scored on the real
users' test windows: clean test NDCG@10 / HR@10 (the run's own test
metrics) and how far the target items climb, T-HR@K / T-NDCG@K (K = --k,
default 50). Writes <workdir>/poisoning.json and poisoning.md (mean ± std
over seeds per attack and variant); finished trainings and target metrics
(<seed dir>/<variant>/targets.json) are read back, so the command resumes.

Variants (--methods): an adv.method name ('none', 'global', 'cas', ...) with
the uniform magnitude, or '<method>_pamacf' (also written '<method>+pamacf')
for adv.method=<method>, adv.magnitude=pamacf (PamaCF's per-user size, see
`cat_jax.adversarial`). --eps takes variant=eps items; a '_pamacf' variant
without its own item uses its method's.
"""

from __future__ import annotations

import json
import math
import os

from absl import app, flags, logging

from cat_jax import batching, checkpoints, stats, train, writer
from cat_jax import adversarial
from cat_jax import data as data_lib
from cat_jax import poisoning
from cat_jax.experiments import common

CLEAN = "clean"
PAMACF = "pamacf"


def parse_variant(name: str) -> tuple[str, str]:
  """'cas' -> ('cas', 'uniform'); 'cas_pamacf' or 'cas+pamacf' -> ('cas',
  'pamacf'). Raises ValueError on an unknown method."""
  method, magnitude = name, "uniform"
  for sep in ("_", "+"):
    if name.endswith(sep + PAMACF):
      method, magnitude = name[:-len(sep + PAMACF)], PAMACF
  if method not in adversarial.METHODS:
    raise ValueError(f"Unknown variant {name!r}: use an adv.method "
                     f"{adversarial.METHODS}, optionally with '_pamacf'.")
  return method, magnitude


def variant_name(name: str) -> str:
  """The canonical name (and sub-folder) of a variant: 'cas+pamacf' ->
  'cas_pamacf'."""
  method, magnitude = parse_variant(name)
  return method if magnitude == "uniform" else f"{method}_{PAMACF}"


def make_variants(config, methods, eps=None) -> dict:
  """{variant: overrides} for `common.run_variants`.

  eps: {variant or method: eps}; a variant takes its own entry, else its
  method's, else config.adv.eps.
  """
  eps = {variant_name(k): v for k, v in (eps or {}).items()}
  out = {}
  for name in methods:
    v = variant_name(name)
    method, magnitude = parse_variant(v)
    out[v] = {"adv.method": method, "adv.magnitude": magnitude,
              "adv.eps": float(eps.get(v, eps.get(method, config.adv.eps)))}
  unknown = sorted(set(eps) - set(out) - {o["adv.method"]
                                           for o in out.values()})
  if unknown:
    raise ValueError(f"--eps names variants that are not run: {unknown}.")
  return out


def attack_dir(attack: str, share: float) -> str:
  """Sub-workdir of an attack: 'clean', or e.g. 'random_0.01'."""
  return CLEAN if attack == "none" else f"{attack}_{share:g}"


def _target_metrics(config, run_dir: str, phase: str, data: dict,
                    num_items: int, targets, k: int, plan) -> dict:
  """T-metrics of a run's selected checkpoint, read back when recorded for
  the same checkpoint epoch, targets and K (<run_dir>/targets.json)."""
  path = os.path.join(run_dir, "targets.json")
  epoch = checkpoints.best_epoch(run_dir, phase)
  key = {"phase": phase, "epoch": epoch, "k": k,
         "targets": [int(t) for t in targets]}
  old = checkpoints.read_json(path)
  if isinstance(old, dict) and all(old.get(a) == b for a, b in key.items()):
    return old["metrics"]
  model, params = train.selected_params(config, run_dir, phase, num_items)
  with train.matmul_precision(config):
    m = poisoning.evaluate_targets(model, params, data, num_items, targets,
                                   config.eval.batch_size, k, plan)
  if writer.is_chief():
    checkpoints.write_json(path, {**key, "metrics": m})
  return m


def run(config, workdir: str, seeds, attacks, shares, methods, eps=None,
        clean: bool = True, k: int = 50, vectorize: bool = False) -> dict:
  """Trains every (attack, share, variant, seed); returns the summary.

  Args:
    config: base config (its data.poison fields other than attack and share
      are used as they are: targets, fillers, seed).
    attacks: poisoning.ATTACKS other than 'none'; shares: fake-user shares.
    methods: variant names (module docstring); eps: {variant or method: eps}.
    clean: also run the clean reference (attack 'none').
    k: cut-off of T-HR@k / T-NDCG@k.

  Returns:
    {'seeds', 'k', 'targets', 'eps', 'magnitude', 'settings': {setting:
    {'attack', 'share', 'fake_users', 'rows': {variant: {metric: {'mean',
    'std', 'values'}}}}}}.
  """
  seeds = list(seeds)
  variants = make_variants(config, methods, eps)
  for a in attacks:
    if a not in poisoning.ATTACKS or a == "none":
      raise ValueError(f"Unknown attack {a!r}; choose from "
                       f"{poisoning.ATTACKS[1:]} (the clean reference is "
                       "run unless --noclean).")
  settings = ([("none", 0.0)] if clean else []) + [
      (a, float(s)) for a in attacks for s in shares]
  if not settings:
    raise ValueError("Nothing to run: no attack and --noclean.")
  tm_names = (f"t_hr@{k}", f"t_ndcg@{k}")
  summary = {"seeds": seeds, "k": k, "targets": None,
             "eps": {v: o["adv.eps"] for v, o in variants.items()},
             "magnitude": {v: o["adv.magnitude"]
                           for v, o in variants.items()},
             "settings": {}}
  for attack, share in settings:
    name = attack_dir(attack, share)
    sub = os.path.join(workdir, name)
    c = common.apply_overrides(config, {"data.poison.attack": attack,
                                        "data.poison.share": share})
    logging.info("poisoning: %s in %s", name, sub)
    runs = common.run_variants(c, sub, seeds, variants, vectorize)
    ds = poisoning.load_from_config(c.data)
    targets = poisoning.targets_from_config(ds, c.data.poison)
    summary["targets"] = [int(t) for t in targets]
    arrays = data_lib.build_arrays(ds, c.data.max_len)
    data = batching.device_data(arrays)
    plan = batching.eval_plan_from_table(arrays.test_inputs, c.eval.buckets,
                                         c.eval.batch_size)
    rows = {}
    for v, overrides in variants.items():
      cv = common.apply_overrides(c, overrides)
      per_seed = {}
      for s in seeds:
        run_dir = os.path.join(sub, f"seed{s}", v)
        m = _target_metrics(cv, run_dir, cv.adv.method, data,
                            arrays.num_items, targets, k, plan)
        per_seed[s] = {**runs[v][s], **{t: m[t] for t in tm_names}}
      rows[v] = {
          metric: dict(zip(("mean", "std"), stats.mean_std(vals)),
                       values=vals)
          for metric in common.METRICS + tm_names
          for vals in [[per_seed[s][metric] for s in seeds]]}
    summary["settings"][name] = {"attack": attack, "share": share,
                                 "fake_users": ds.num_fake_users,
                                 "rows": rows}
  return summary


def to_markdown(summary: dict) -> str:
  """One row per setting and variant: mean ± std over the seeds."""
  k = summary["k"]
  lines = [f"| data | variant | NDCG@10 | HR@10 | T-HR@{k} | T-NDCG@{k} |",
           "|---|---|---|---|---|---|"]
  fmt = lambda d: ("—" if d is None or not math.isfinite(d["mean"]) else
                   f"{d['mean']:.4f} ± {d['std']:.4f}")
  for name, setting in summary["settings"].items():
    label = name if setting["attack"] == "none" else \
        f"{setting['attack']} {100 * setting['share']:g}% " \
        f"({setting['fake_users']} fake users)"
    for v, row in setting["rows"].items():
      eps = summary["eps"].get(v)
      vlabel = v if v == "none" or eps is None else f"{v} (eps {eps:g})"
      lines.append(f"| {label} | {vlabel} | {fmt(row['test/ndcg@10'])} | "
                   f"{fmt(row['test/hr@10'])} | {fmt(row[f't_hr@{k}'])} | "
                   f"{fmt(row[f't_ndcg@{k}'])} |")
  return ("\n".join(lines) + f"\n\ntargets: {summary['targets']}; seeds: "
          f"{summary['seeds']}\n")


def write(workdir: str, summary: dict) -> str:
  """Writes poisoning.json and poisoning.md (process 0); returns the table."""
  md = to_markdown(summary)
  if writer.is_chief():
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "poisoning.json"), "w") as f:
      json.dump(summary, f, indent=1)
    with open(os.path.join(workdir, "poisoning.md"), "w") as f:
      f.write(md)
  return md


def parse_eps(text: str) -> dict:
  """'global=0.1,cas_pamacf=0.2' -> {'global': 0.1, 'cas_pamacf': 0.2}."""
  out = {}
  for item in common.split_list(text):
    name, eq, value = item.partition("=")
    try:
      out[name] = float(value)
    except ValueError:
      raise ValueError(f"--eps item {item!r} is not variant=number.") from None
    if not eq:
      raise ValueError(f"--eps item {item!r} is not variant=number.")
  return out


def main(argv):
  del argv
  writer.quiet_library_logs()
  F = flags.FLAGS
  try:
    summary = run(F.config, F.workdir, common.split_list(F.seeds, int),
                  common.split_list(F.attacks),
                  common.split_list(F.share, float),
                  common.split_list(F.methods), parse_eps(F.eps), F.clean,
                  F.k, F.vectorize)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  md = write(F.workdir, summary)
  logging.info("\n%s", md)
  print(md)


def define_flags():
  common.define_run_flags()
  flags.DEFINE_string("attacks", "random,bandwagon",
                      "Comma-separated attacks (data.poison.attack).")
  flags.DEFINE_string("share", "0.01", "Comma-separated fake-user shares of "
                      "the real users (data.poison.share).")
  flags.DEFINE_string("methods", "none,global,cas,cas_pamacf",
                      "Comma-separated variants: adv.method names, or "
                      "<method>_pamacf for adv.magnitude=pamacf.")
  flags.DEFINE_string("eps", "", "Per-variant (or per-method) eps, "
                      "'global=0.1,cas=0.1'; the others use config.adv.eps.")
  flags.DEFINE_bool("clean", True, "Also train on the clean data (the "
                    "reference, <workdir>/clean).")
  flags.DEFINE_integer("k", 50, "Cut-off K of T-HR@K and T-NDCG@K.")


if __name__ == "__main__":
  define_flags()
  common.run_app(main)
