"""The figures of README.md and RESULTS.md: Table 2 gains, Fig. 5/6 drops.

  python -m cat_jax.experiments.figures                 # docs/results/final.json
  python -m cat_jax.experiments.figures --runs=$RUNS    # $RUNS/paper_summary.json

Writes two PNG files to --out (default docs/figures):

  table2_gains.png      per setting, each method's test NDCG@10 gain over
                        the base (ours: over `none`, the base trained as
                        long; the paper's: over its phase-1 base), ours
                        beside the paper's Table 2;
  robustness_drops.png  per setting, the relative NDCG@10 drop of each model
                        when the first, middle or last item (Fig. 5) or the
                        last K items (Fig. 6) of the test window are
                        replaced (minimal attack), mean ± std over seeds.

The numbers come from one of two sources. By default, the committed
docs/results/final.json: the final three-seed tables of RESULTS.md,
transcribed (the run folders they came from are gone). With --runs, the
`paper_summary.json` that `cat_jax.experiments.paper_summary` writes there
(gains and last-item drops), and, where present, each setting's
`paper_<setting>/robustness_minimal.json` (`robustness_report`) for every
attack with its spread. Needs matplotlib (`pip install -e ".[plots]"`).
Nothing is trained or attacked here.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

from cat_jax.experiments import common

GAIN_METHODS = ("linear", "seq", "global", "cas", "cas_temporal", "cas_cross")
DROP_MODELS = ("base", "none", "global", "cas")
ATTACKS = ("first", "middle", "last", "last_2", "last_3", "last_4", "last_5")
ATTACK_LABELS = ("first", "middle", "last", "last 2", "last 3", "last 4",
                 "last 5")
COLORS = {"base": "#9e9e9e", "none": "#616161", "linear": "#8c6d31",
          "seq": "#bcbd22", "global": "#1f77b4", "cas": "#d62728",
          "cas_temporal": "#ff9896", "cas_cross": "#9467bd"}
_DATA = {"video": "Video", "beauty": "Beauty", "clothing": "Clothing",
         "ml1m": "ML-1M"}
_MODEL = {"sasrec": "SASRec", "gru4rec": "GRU4Rec"}


def label(setting: str) -> str:
  """'sasrec_video' -> 'Video SASRec' (unknown parts kept as they are)."""
  model, _, data = setting.partition("_")
  return f"{_DATA.get(data, data)} {_MODEL.get(model, model)}".strip()


def _paper_gains(paper: dict) -> dict:
  base = paper.get("none")
  return {m: 100.0 * (v / base - 1.0) for m, v in paper.items()
          if m != "none" and base}


def from_final(data: dict) -> list[dict]:
  """Figure data [{name, label, gain, paper_gain, drops, paper_drops}] of
  the settings listed under "figures" in a final.json dict."""
  out = []
  for name in data.get("figures") or list(data["settings"]):
    s = data["settings"][name]
    t2, rob = s.get("table2") or {}, s.get("robustness") or {}
    rows = t2.get("rows", {})
    gain = {}
    for m, r in rows.items():
      if m == "none":
        continue
      pct = r.get("pct_vs_none")
      if pct is None and "none" in rows:
        pct = 100.0 * (r["mean"] / rows["none"]["mean"] - 1.0)
      gain[m] = pct
    drops = {m: {a: tuple(r[a]) for a in ATTACKS if r.get(a) is not None}
             for m, r in rob.get("rows", {}).items()}
    paper_drops = (rob.get("paper") or {}).get("base", {})
    out.append({"name": name, "label": s.get("label") or label(name),
                "gain": gain,
                "paper_gain": _paper_gains(t2.get("paper") or
                                           s.get("paper") or {}),
                "drops": drops, "paper_drops": paper_drops})
  return out


def _report_drops(report: dict) -> dict:
  """{model: {attack: (mean %, std %)}} of a robustness_report JSON."""
  drops = {}
  for attack, block in report.get("by_attack", {}).items():
    a = "last" if attack == "last_1" else attack
    if a not in ATTACKS:
      continue
    for model, row in block.get("rows", {}).items():
      m = "base" if model == "pretrain" else model
      d = row["drop"]
      drops.setdefault(m, {})[a] = (100.0 * d["mean"], 100.0 * d["std"])
  return drops


def from_paper_summary(summary: dict, runs: str | None = None) -> list[dict]:
  """Figure data from paper_summary.json; drops for every attack from
  <runs>/paper_<setting>/robustness_minimal.json where it exists, else the
  summary's last-item drops (without spread)."""
  out = []
  for name, s in summary["settings"].items():
    gain = {m: 100.0 * g for m, g in (s.get("ours_gain") or {}).items()
            if m != "none" and g is not None}
    paper_gain = {m: 100.0 * g for m, g in (s.get("paper_gain") or {}).items()
                  if m != "none" and g is not None}
    report = None
    if runs:
      path = os.path.join(runs, f"paper_{name}", "robustness_minimal.json")
      if os.path.exists(path):
        with open(path) as f:
          report = json.load(f)
    if report is not None:
      drops = _report_drops(report)
    else:
      drops = {("base" if m == "pretrain" else m): {"last": (100.0 * d, 0.0)}
               for m, d in (s.get("last_item_drop") or {}).items()
               if d is not None}
    paper_last = s.get("paper_last_item_drop")
    out.append({"name": name, "label": label(name), "gain": gain,
                "paper_gain": paper_gain, "drops": drops,
                "paper_drops": ({} if paper_last is None
                                else {"last": 100.0 * paper_last})})
  return out


def _grid(plt, n: int, width: float, height: float):
  cols = min(n, 3)
  rows = (n + cols - 1) // cols
  fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows),
                           squeeze=False)
  axes = [a for row in axes for a in row]
  for a in axes[n:]:
    a.set_visible(False)
  return fig, axes[:n]


def plot_gains(settings: list[dict], path: str, plt) -> None:
  """table2_gains.png: ours (solid) beside the paper's (hatched) gains."""
  fig, axes = _grid(plt, len(settings), 4.2, 3.0)
  for ax, s in zip(axes, settings):
    methods = [m for m in GAIN_METHODS
               if s["gain"].get(m) is not None or m in s["paper_gain"]]
    xs = range(len(methods))
    ours = [s["gain"].get(m) for m in methods]
    ax.bar([x - 0.2 for x in xs], [0.0 if v is None else v for v in ours],
           0.4, color=[COLORS[m] for m in methods], label="ours")
    ax.bar([x + 0.2 for x in xs],
           [s["paper_gain"].get(m, 0.0) for m in methods], 0.4,
           color="white", edgecolor=[COLORS[m] for m in methods],
           hatch="///")
    for x, v in zip(xs, ours):
      if v is not None:
        ax.annotate("0" if abs(v) < 0.5 else f"{v:+.0f}",
                    (x - 0.2, max(v, 0.0)), ha="center", va="bottom",
                    fontsize=7)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([m.replace("cas_", "cas_\n") for m in methods],
                       fontsize=7)
    ax.set_title(s["label"], fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
  axes[0].set_ylabel("test NDCG@10 gain over base (%)", fontsize=8)
  from matplotlib.patches import Patch as patch  # noqa: PLC0415
  axes[0].legend(handles=[patch(color="#555555", label="ours"),
                          patch(facecolor="white", edgecolor="#555555",
                                hatch="///", label="paper")],
                 fontsize=7, loc="upper left")
  fig.suptitle("Table 2: gain of each method over the base (ours: 3 seeds, "
               "over `none`; paper: hatched)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def plot_drops(settings: list[dict], path: str, plt) -> None:
  """robustness_drops.png: Fig. 5 points and Fig. 6 lines per model."""
  fig, axes = _grid(plt, len(settings), 4.2, 3.0)
  for ax, s in zip(axes, settings):
    for m in DROP_MODELS:
      d = s["drops"].get(m)
      if not d:
        continue
      pts = [(i, d[a]) for i, a in enumerate(ATTACKS) if a in d]
      single = [(i, v) for i, v in pts if i < 2]
      tail = [(i, v) for i, v in pts if i >= 2]
      kw = {"color": COLORS[m], "capsize": 2, "markersize": 4,
            "linewidth": 1.2}
      if tail:
        ax.errorbar([i for i, _ in tail], [v[0] for _, v in tail],
                    [v[1] for _, v in tail], fmt="o-", label=m, **kw)
      if single:
        ax.errorbar([i for i, _ in single], [v[0] for _, v in single],
                    [v[1] for _, v in single], fmt="o",
                    label=None if tail else m, **kw)
    paper = s.get("paper_drops") or {}
    pp = [(ATTACKS.index(a), v) for a, v in paper.items() if a in ATTACKS]
    if pp:
      ax.plot([i for i, _ in pp], [v for _, v in pp], "k*", markersize=8,
              label="paper, base\n(first, middle: < 3%)")
    ax.set_xticks(range(len(ATTACKS)))
    ax.set_xticklabels(ATTACK_LABELS, fontsize=7, rotation=30)
    ax.set_ylim(0, 100)
    ax.set_title(s["label"], fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="y", linewidth=0.3)
  axes[0].set_ylabel("test NDCG@10 drop (%)", fontsize=8)
  axes[0].legend(fontsize=7, loc="center right")
  fig.suptitle("Fig. 5/6: NDCG@10 lost when items of the test window are "
               "replaced (minimal attack; mean ± std over 3 seeds)",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


FILES = ("table2_gains.png", "robustness_drops.png")


def write_figures(settings: list[dict], out: str) -> list[str]:
  """Both PNG files under `out`; raises ImportError without matplotlib."""
  plt = common.pyplot()
  if plt is None:
    raise ImportError('matplotlib is not installed: pip install -e ".[plots]"')
  os.makedirs(out, exist_ok=True)
  paths = [os.path.join(out, f) for f in FILES]
  plot_gains([s for s in settings if s["gain"]], paths[0], plt)
  # A setting whose Fig. 5/6 is not run yet has no panel there.
  plot_drops([s for s in settings if s["drops"]], paths[1], plt)
  return paths


def load(data: str, runs: str | None) -> list[dict]:
  """The figure data from --runs (paper_summary.json) or --data."""
  if runs:
    path = os.path.join(runs, "paper_summary.json")
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"No {path}: run `python -m cat_jax.experiments.paper_summary "
          f"--runs={runs}` first.")
    with open(path) as f:
      return from_paper_summary(json.load(f), runs)
  if not os.path.exists(data):
    raise FileNotFoundError(f"No data file {data}: give --data or --runs.")
  with open(data) as f:
    return from_final(json.load(f))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  F = flags.FLAGS
  try:
    paths = write_figures(load(F.data, F.runs), F.out)
  except (FileNotFoundError, ImportError, KeyError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print("\n".join(paths))


def define_flags():
  flags.DEFINE_string("data", os.path.join("docs", "results", "final.json"),
                      "Transcribed results (used unless --runs is given).")
  flags.DEFINE_string("runs", None, "RUNS folder holding paper_summary.json "
                      "(and paper_<setting>/robustness_minimal.json).")
  flags.DEFINE_string("out", os.path.join("docs", "figures"),
                      "Folder for the PNG files.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
