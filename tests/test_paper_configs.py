"""The Clothing configs (issue 32) resolve, read their file, and build the
model and the phase-2 objective at their settings.

A real run of 1 + 1 epochs is too slow for the suite even on 100 users of
the file (77 s for SASRec, 38 s for GRU4Rec on one core, compilation
dominating), so the head of the file goes through the data pipeline as a run
reads it, and the model and the `cas` objective are traced on its windows
with `jax.eval_shape` (shapes and dtypes, nothing compiled).
"""

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cat_jax import adversarial, cascade, config_lib, data, models, poisoning
from cat_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Paper Table 1 (and ../shared/data/README.md): users, items, interactions.
CLOTHING_TABLE_1 = (39387, 23033, 278677)
# Users read from the head of the file: enough for a batch of windows.
HEAD_USERS = 300


def shared_file(name: str) -> str:
  """`name` under $CAT_DATA_DIR or ../shared/data; skips the test when it is
  in neither."""
  from conftest import SHARED_DATA
  dirs = [d for d in (os.environ.get("CAT_DATA_DIR"), SHARED_DATA) if d]
  path = next((os.path.join(d, name) for d in dirs
               if os.path.exists(os.path.join(d, name))), None)
  if path is None:
    pytest.skip(f"{name} is in none of {dirs}")
  return path


def test_shared_clothing_file_matches_table_1():
  path = shared_file("Clothing.txt")
  stats = data.describe(data.load_dataset(path))
  assert (stats["users"], stats["items"], stats["interactions"]) == \
      CLOTHING_TABLE_1


@pytest.mark.parametrize("model", models.MODELS)
def test_clothing_config_reads_its_file_and_builds_phase_2(model, tmp_path):
  config = config_lib.load_config_file(
      os.path.join(ROOT, "configs", f"{model}_clothing.py"))
  path, max_len = config_lib.PAPER_DATASETS["clothing"]
  assert (config.model.name, config.data.name, config.data.path,
          config.data.max_len) == (model, "file", path, max_len)
  assert config.adv.method == "cas"
  assert config.adv.eps == config_lib.tuned_eps(model, "clothing", "cas")
  train.validate_config(config)

  # The head of the file, read as a run reads its data.
  head = tmp_path / path
  with open(shared_file(path)) as src:
    head.write_text("".join(itertools.islice(src, HEAD_USERS)))
  config.data.path = str(head)
  ds = poisoning.load_from_config(config.data)
  assert ds.num_users == HEAD_USERS
  arrays = data.build_arrays(ds, config.data.max_len)
  assert arrays.train_inputs.shape == (HEAD_USERS, max_len)
  assert len(arrays.eval_users) == HEAD_USERS  # 5-core: every user has both

  # The cascade weights of the windows, and one phase-2 batch traced.
  pert = cascade.weights_for_method(arrays.train_inputs,
                                    config.train.batch_size, "cas")
  assert np.isfinite(np.asarray(pert)).all()
  net = models.build_model(config.model, ds.num_items, max_len)
  params = jax.eval_shape(net.init, jax.random.PRNGKey(0),
                          jnp.ones((1, max_len), jnp.int32))
  objective = adversarial.make_objective(net, train.adv_config(config))
  # Traced, not run: only the shapes and dtypes of the batch matter.
  rows = slice(0, config.train.batch_size)
  batch = {"inputs": jnp.asarray(arrays.train_inputs[rows]),
           "targets": jnp.asarray(arrays.train_targets[rows]),
           "negatives": jnp.asarray(arrays.train_targets[rows]),
           "weights": jnp.asarray(arrays.train_targets[rows] > 0,
                                  jnp.float32),
           "pert": pert[rows]}
  loss, terms = jax.eval_shape(objective, params, batch,
                               jax.random.PRNGKey(1))
  assert loss.shape == () and loss.dtype == jnp.float32
  assert set(terms) == {"loss", "bce", "adv1", "adv2"}
