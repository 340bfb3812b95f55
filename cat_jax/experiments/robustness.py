"""Paper Fig. 5 and 6: item-replacement robustness of trained phases.

  python -m cat_jax.experiments.robustness --config=configs/sasrec_video.py \
      --workdir=runs/table2_sasrec_video/seed0 --phases=pretrain,none/none,cas/cas

For every phase (a finished `<workdir>/<phase>/best` checkpoint), replaces
the first / middle / last item (Fig. 5) and the last K = 1..5 items (Fig. 6)
of each user's test input window and reports clean and attacked NDCG@10 /
HR@10 and the relative drop. Writes <workdir>/robustness_<mode>.json (each
entry as soon as it is attacked) and, when matplotlib is installed (`pip
install -e ".[plots]"`), a PNG figure. Run again, it reuses the entries of
that file attacked from the same selected checkpoint with the same
arguments, so a stopped call resumes and a retrained phase is attacked anew.

--mode (see `cat_jax.robustness`): `minimal` (default, Sec. 5.6: the nearest
allowed item whose displacement from the original points along the gradient
of the target's ranking loss), `cosine` (the same, nearest in angle rather
than L2 distance), `step` (the item nearest to a gradient step of
size --alpha; called `gradient` before, which is still accepted), `snap` (as
`step`, but a position keeps its item when the step point is nearest to it)
or `random`. The step is --alpha, or --alpha_scale times the median
nearest-neighbour distance of each model's item table (default 1); with
either flag the output name carries it (robustness_snap_x0.5.json).

--anchor=window replaces the fixed slots 0 and (T - 1) // 2 of the padded
input window as 'first' and 'middle' instead of the first and middle real
items (`cat_jax.robustness`; a reading of Fig. 5 under which short windows
are not attacked there); the output name ends in '_window'.
"""

from __future__ import annotations

import os

import jax
from absl import app, flags, logging

from cat_jax import batching, checkpoints, compilation, robustness, train
from cat_jax import writer
from cat_jax.experiments import common


def source(workdir: str, entry: str) -> dict:
  """What an entry is attacked from: its phase's selected epoch and that
  checkpoint's validation NDCG@10, so that a retrained phase is not
  mistaken for the one a stored result was computed on."""
  sub, phase = os.path.split(entry)
  r = checkpoints.read_json(os.path.join(workdir, sub, phase, "results.json"))
  if r is None:
    return {}
  return {k: r.get(k) for k in ("selected_epoch", "valid/ndcg@10")}


def run(config, workdir: str, phases, mode: str, alpha=None,
        seed: int = 0, alpha_scale=None, last_k=(1, 2, 3, 4, 5),
        anchor: str = "items", previous=None, save=None) -> dict:
  """{entry: evaluate_robustness(...) + 'source', 'request'} per phase.

  An entry is a phase name ('pretrain', 'cas') or 'subdir/phase' for a
  phase trained in a subfolder of `workdir` (the runners' layout, e.g.
  'cas/cas'). alpha_scale (modes 'step'/'snap', exclusive with alpha): the
  step is this multiple of the model's median nearest-neighbour distance.
  last_k: K values of the last-K attack (Fig. 6; () runs Fig. 5 only).
  anchor: 'items' or 'window' (`robustness.evaluate_robustness`).
  previous: an earlier result of this call (its JSON); an entry in it with
    the same `source` (the phase's selected checkpoint) and `request` (the
    attack's arguments) is reused instead of attacked again, so a stopped
    call resumes at the entry it was in.
  save: called after each entry is attacked with the results so far (and
    the earlier results of the entries still to come).
  """
  if alpha is not None and alpha_scale is not None:
    raise ValueError("Give --alpha or --alpha_scale, not both.")
  request = {"mode": mode, "alpha": alpha, "alpha_scale": alpha_scale,
             "seed": seed, "last_k": list(last_k), "anchor": anchor}
  previous = previous or {}
  out = {}
  for entry in phases:
    src = source(workdir, entry)
    old = previous.get(entry, {})
    if src and old.get("source") == src and old.get("request") == request:
      logging.info("%s: attacked before from the same checkpoint; reused",
                   entry)
      out[entry] = old
      continue
    sub, phase = os.path.split(entry)
    model, params, data, num_items = train.load_selected(
        config, os.path.join(workdir, sub), phase)
    plan = batching.eval_plan_from_table(
        data["test_inputs"], config.eval.buckets, config.eval.batch_size)
    step = alpha
    if alpha_scale is not None:
      step = alpha_scale * float(robustness.median_nn_distance(
          model.items(params)))
    out[entry] = robustness.evaluate_robustness(
        model, params, data, num_items, mode=mode,
        alpha=step, last_k=tuple(last_k),
        batch_size=config.eval.batch_size,
        ks=tuple(config.eval.ks), rng=jax.random.PRNGKey(seed), plan=plan,
        anchor=anchor)
    out[entry].update(source=src, request=request)
    if save is not None:
      # Entries still to come keep their earlier result on disk meanwhile.
      save({e: out[e] if e in out else previous[e] for e in phases
            if e in out or e in previous})
  return out


def output_stem(mode: str, alpha=None, alpha_scale=None,
                anchor: str = "items") -> str:
  """'robustness_<mode>', with '_a<alpha>' or '_x<scale>' when given, so
  that a sweep over step sizes keeps every result, and '_window' for
  anchor 'window'."""
  stem = f"robustness_{mode}"
  if alpha is not None:
    stem += f"_a{alpha:g}"
  if alpha_scale is not None:
    stem += f"_x{alpha_scale:g}"
  if anchor != "items":
    stem += f"_{anchor}"
  return stem


def plot(results: dict, path: str, metric: str = "ndcg@10") -> bool:
  """Fig. 5 (bars) and Fig. 6 (lines) of relative drops; False w/o matplotlib."""
  plt = common.pyplot()
  if plt is None:
    logging.warning("matplotlib is not installed; skipping %s", path)
    return False
  fig, (a5, a6) = plt.subplots(1, 2, figsize=(10, 3.5))
  phases = list(results)
  width = 0.8 / max(len(phases), 1)
  for i, phase in enumerate(phases):
    att = results[phase]["attacks"]
    names = [n for n in robustness.POSITIONS if n in att]
    a5.bar([j + i * width for j in range(len(names))],
           [att[n][f"{metric}_drop"] for n in names], width, label=phase)
    ks = sorted(int(n[5:]) for n in att if n.startswith("last_"))
    a6.plot(ks, [att[f"last_{k}"][f"{metric}_drop"] for k in ks], "o-",
            label=phase)
  a5.set_xticks([j + width * (len(phases) - 1) / 2 for j in range(3)])
  a5.set_xticklabels(robustness.POSITIONS)
  a5.set_ylabel(f"relative {metric} drop")
  a5.set_title("one item replaced (Fig. 5)")
  a6.set_xlabel("last K items replaced")
  a6.set_title("last K replaced (Fig. 6)")
  a5.legend()
  a6.legend()
  common.save_figure(fig, path)
  return True


def main(argv):
  del argv
  writer.quiet_library_logs()
  compilation.setup_cache()
  F = flags.FLAGS
  path = os.path.join(F.workdir, output_stem(F.mode, F.alpha,
                                             F.alpha_scale, F.anchor))
  previous = checkpoints.read_json(path + ".json")

  def save(results):
    # Each finished entry is on disk at once (atomically, process 0), so
    # that a stopped call keeps it; at the end the file holds exactly this
    # call's --phases, in their order (robustness_report compares them by
    # seed).
    checkpoints.write_json(path + ".json", results)

  try:
    results = run(F.config, F.workdir, common.split_list(F.phases), F.mode,
                  F.alpha, F.seed, F.alpha_scale,
                  common.split_list(F.last_k, int), F.anchor, previous, save)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  save(results)
  if writer.is_chief():
    plot(results, path + ".png")
  for phase, r in results.items():
    line = " ".join(f"{n}={a['ndcg@10_drop']:+.3f}"
                    for n, a in r["attacks"].items())
    print(f"{phase}: clean ndcg@10={r['clean']['ndcg@10']:.4f} drops: {line}")
    last = r["attacks"].get("last")
    if last:
      print(f"  last item: replaced in {last['replaced']:.1%} of windows, "
            f"replacement/original norm {last['norm_ratio']:.2f}"
            f", training count {last['count_replacement']:.0f} vs "
            f"{last['count_original']:.0f} (medians)")


def define_flags():
  """Flags of the command line (not defined on import, so that the
  experiment modules can be imported together)."""
  common.define_run_flags("Config file of the run.",
                          "Workdir of the trained run.", seeds=False)
  flags.DEFINE_string("phases", "pretrain",
                      "Comma-separated phases ('phase' or 'subdir/phase').")
  flags.DEFINE_enum(
      "mode", "minimal", robustness.MODES + tuple(robustness.MODE_ALIASES),
      "Replacement rule: 'minimal' (Sec. 5.6: nearest allowed item in the "
      "direction of the target-loss gradient), 'cosine' (the same, nearest "
      "in angle), 'step' (nearest item to a "
      "gradient step of --alpha; 'gradient' is its old name), 'snap' (as "
      "'step', the original item competing) or 'random'.")
  flags.DEFINE_float("alpha", None, "Gradient step of --mode=step/snap "
                     "(default: median nearest-neighbour distance of the "
                     "item table).")
  flags.DEFINE_float("alpha_scale", None, "Gradient step of --mode=step/snap "
                     "as a multiple of the median nearest-neighbour distance "
                     "of each model's item table (instead of --alpha).")
  flags.DEFINE_integer("seed", 0, "Seed of the random replacements.")
  flags.DEFINE_string("last_k", "1,2,3,4,5", "Comma-separated K of the "
                      "last-K attack (Fig. 6); empty for Fig. 5 only.")
  flags.DEFINE_enum("anchor", "items", robustness.ANCHORS,
                    "'items': first/middle are the first and middle real "
                    "items of each window; 'window': the fixed slots 0 and "
                    "(T-1)//2 of the padded input window (only where they "
                    "hold a real item).")


if __name__ == "__main__":
  define_flags()
  common.run_app(main)
