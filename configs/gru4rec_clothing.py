"""gru4rec on clothing with the paper's settings (Tan et al., Sec. 5.3). The Amazon Clothing, Shoes and Jewelry 5-core set (paper Table 1: 39,387 users, 23,033 items, density 0.031%).

  export CAT_DATA_DIR=../shared/data     # or pass --config.data.path=...
  python launch.py --config=configs/gru4rec_clothing.py --workdir=runs/gru4rec_clothing
  python launch.py --config=configs/gru4rec_clothing.py:method=linear,seed=1
"""

from cat_jax import config_lib


def get_config(arg=None):
  return config_lib.paper_config("gru4rec", "clothing", arg)
