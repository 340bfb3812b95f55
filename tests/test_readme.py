"""README.md, RESULTS.md and docs/: sizes, runnable code, links, names.

The python blocks of README.md preceded by `<!-- test: run -->` are run as
written; every other python block of the documentation must at least parse.
Links to files and headings of this checkout must resolve, and every config
field, module, config file and script the documentation names must exist.
"""

import ast
import glob
import importlib.util
import os
import re

import pytest

from cat_jax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_TAG = "<!-- test: run -->"
README = "README.md"
RESULTS = "RESULTS.md"
DOCS = sorted(os.path.relpath(p, ROOT)
              for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
# Written by the fault-handling work (another change); linked from here.
NOT_OURS = {"docs/workdir.md"}
OURS = [README, RESULTS] + [d for d in DOCS if d not in NOT_OURS]


def read(rel: str) -> str:
  with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
    return f.read()


def fenced_blocks(text: str):
  """[(language, code, tagged)] of the ``` blocks; tagged when the last
  non-empty line before the opening fence is RUN_TAG."""
  out, lines, i = [], text.splitlines(), 0
  while i < len(lines):
    m = re.match(r"^```(\w*)\s*$", lines[i])
    if not m:
      i += 1
      continue
    before = [l for l in lines[:i] if l.strip()]
    tagged = bool(before) and before[-1].strip() == RUN_TAG
    j = i + 1
    while j < len(lines) and not lines[j].startswith("```"):
      j += 1
    out.append((m.group(1), "\n".join(lines[i + 1:j]) + "\n", tagged))
    i = j + 1
  return out


def prose(text: str) -> str:
  """The text without its fenced blocks and inline code."""
  text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
  return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
  """GitHub's anchor of a heading."""
  h = heading.strip().lower().replace("`", "")
  h = re.sub(r"[^\w\- ]", "", h)
  return h.replace(" ", "-")


def anchors(rel: str) -> set:
  return {slug(m.group(1)) for m in
          re.finditer(r"^#+\s+(.*)$", prose(read(rel)), flags=re.M)}


def test_sizes():
  assert os.path.getsize(os.path.join(ROOT, README)) <= 12 * 1024
  assert os.path.getsize(os.path.join(ROOT, RESULTS)) <= 40 * 1024


def test_readme_runnable_blocks_run(capsys):
  blocks = [(lang, code) for lang, code, tagged in fenced_blocks(read(README))
            if tagged]
  assert blocks, f"no block of README.md is tagged {RUN_TAG}"
  for lang, code in blocks:
    assert lang == "python", f"a {lang or 'plain'} block is tagged to run"
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})  # noqa: S102
  out = capsys.readouterr().out
  for term in ("'loss'", "'bce'", "'adv1'", "'adv2'"):
    assert term in out


@pytest.mark.parametrize("rel", OURS)
def test_python_blocks_parse(rel):
  for lang, code, _ in fenced_blocks(read(rel)):
    if lang == "python":
      ast.parse(code)


def test_readme_names_no_folder_outside_the_checkout():
  text = read(README)
  for pattern in (r"\.\./", r"/work/", r"~/", r"shared/data"):
    assert not re.search(pattern, text), pattern
  # CAT_DATA_DIR is set to a placeholder, not to our own layout.
  for m in re.finditer(r"CAT_DATA_DIR=(\S+)", text):
    assert m.group(1).startswith("/path/to"), m.group(0)


@pytest.mark.parametrize("rel", OURS)
def test_docs_name_no_folder_of_our_machine(rel):
  text = read(rel)
  for pattern in (r"\.\./shared", r"/work/"):
    assert not re.search(pattern, text), (rel, pattern)


@pytest.mark.parametrize("rel", OURS)
def test_local_links_resolve(rel):
  base = os.path.dirname(rel)
  for m in re.finditer(r"\]\(([^)\s]+)\)", prose(read(rel))):
    target = m.group(1)
    if re.match(r"^[a-z]+:", target):
      continue
    path, _, anchor = target.partition("#")
    dest = os.path.normpath(os.path.join(base, path)) if path else rel
    if dest in NOT_OURS and not os.path.exists(os.path.join(ROOT, dest)):
      continue
    assert os.path.exists(os.path.join(ROOT, dest)), (rel, target)
    if anchor:
      assert dest.endswith(".md"), (rel, target)
      assert anchor in anchors(dest), (rel, target)


def _has_field(config, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return True


@pytest.mark.parametrize("rel", OURS)
def test_named_config_fields_modules_and_files_exist(rel):
  text = read(rel)
  config = config_lib.base_config()
  for m in re.finditer(r"--config\.([a-z_]+(?:\.[a-z_0-9]+)+)", text):
    assert _has_field(config, m.group(1)), (rel, m.group(0))
  for m in re.finditer(r"python -m (cat_jax[\w.]*)", text):
    assert importlib.util.find_spec(m.group(1)) is not None, (rel, m.group(0))
  for m in re.finditer(r"\b((?:configs|scripts|benchmarks)/[\w.]+\.(?:py|sh))",
                       text):
    assert os.path.exists(os.path.join(ROOT, m.group(1))), (rel, m.group(1))


def test_readme_keeps_the_demo_output_marker():
  text = read(README)
  i = text.index("<!-- demo-output -->")
  assert text[i:].split("\n", 2)[1].startswith("```"), (
      "the demo's expected output block follows its marker")
