"""Tables the phase-2 runs of scripts/video_cpu_sweep.sh (one seed).

  python scripts/collect_phase2.py runs/video

For each run folder <method>_<scope>_eps<eps>/ it reads the selected
checkpoint's validation NDCG@10 (best.json) and test metrics (results.json),
prints every run, then, per method, the eps/scope chosen on validation.
"""

import json
import os
import sys


def main(root):
  rows = []
  for name in sorted(os.listdir(root)):
    parts = name.split("_")
    if len(parts) < 3 or not parts[-1].startswith("eps"):
      continue
    method = "_".join(parts[:-2])
    path = os.path.join(root, name, method, "results.json")
    if not os.path.exists(path):
      continue
    r = json.load(open(path))
    rows.append((method, parts[-2], float(parts[-1][3:]), r))
  base = [r for m, _, _, r in rows if m == "none"]
  base_ndcg = base[0]["test/ndcg@10"] if base else None
  print("| method | scope | eps | valid NDCG@10 | test NDCG@10 | test HR@10 |"
        " % vs none |\n|---|---|---|---|---|---|---|")
  setting = lambda m, scope, eps: "-" if m == "none" else f"{eps:g}, {scope}"
  for m, scope, eps, r in sorted(rows, key=lambda x: (x[0], x[1], x[2])):
    if m == "none":
      scope, eps = "-", float("nan")
    pct = (f"{100 * (r['test/ndcg@10'] / base_ndcg - 1):+.1f}%"
           if base_ndcg else "")
    eps_s = "-" if m == "none" else f"{eps:g}"
    print(f"| {m} | {scope} | {eps_s} | {r['valid/ndcg@10']:.4f} | "
          f"{r['test/ndcg@10']:.4f} | {r['test/hr@10']:.4f} | {pct} |")
  print("\nChosen on validation NDCG@10, per method:\n")
  print("| method | eps, scope | test NDCG@10 | test HR@10 | % vs none |\n"
        "|---|---|---|---|---|")
  for m in dict.fromkeys(x[0] for x in rows):
    _, scope, eps, r = max((x for x in rows if x[0] == m),
                           key=lambda x: x[3]["valid/ndcg@10"])
    pct = (f"{100 * (r['test/ndcg@10'] / base_ndcg - 1):+.1f}%"
           if base_ndcg else "")
    print(f"| {m} | {setting(m, scope, eps)} | {r['test/ndcg@10']:.4f} | "
          f"{r['test/hr@10']:.4f} | {pct} |")


if __name__ == "__main__":
  main(sys.argv[1])
