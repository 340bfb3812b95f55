"""sasrec on beauty with the paper's settings (Tan et al., Sec. 5.3). The Amazon Beauty 5-core set (22,363 users, 12,101 items).

  export CAT_DATA_DIR=../shared/data     # or pass --config.data.path=...
  python launch.py --config=configs/sasrec_beauty.py --workdir=runs/sasrec_beauty
  python launch.py --config=configs/sasrec_beauty.py:method=linear,seed=1
"""

from cat_jax import config_lib


def get_config(arg=None):
  return config_lib.paper_config("sasrec", "beauty", arg)
