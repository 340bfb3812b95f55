"""sasrec on beauty with the paper's settings (Tan et al., Sec. 5.1). The Amazon Beauty 5-core set (22,363 users, 12,101 items).

  export CAT_DATA_DIR=../shared/data     # or pass --config.data.path=...
  python launch.py --config=configs/sasrec_beauty.py --workdir=runs/sasrec_beauty
  python launch.py --config=configs/sasrec_beauty.py:method=linear,seed=1
"""

from cat_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, method="cas", eps=10.0, seed=0, path="Beauty.txt")
  c = config_lib.base_config()
  c.seed = a.seed
  c.data.name = "file"
  c.data.path = a.path
  c.data.max_len = 50
  c.model.name = "sasrec"
  c.adv.method = a.method
  c.adv.eps = a.eps
  return c
