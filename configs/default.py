"""Synthetic data, small SASRec, both phases with `cas`: under 2 min on 2 CPUs.

  python launch.py                                  # this config
  python launch.py --config=configs/default.py:model=gru4rec,method=seq
  python launch.py --config.adv.method=global --config.adv.eps=1
"""

from cat_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, model="sasrec", method="cas", eps=10.0,
                           seed=0)
  c = config_lib.base_config()
  c.seed = a.seed
  c.data.name = "synthetic"
  c.data.max_len = 20
  c.model.name = a.model
  c.model.hidden = 32
  c.train.epochs = 20
  c.train.eval_every = 5
  c.adv.method = a.method
  c.adv.eps = a.eps
  c.adv.epochs = 5
  return c
