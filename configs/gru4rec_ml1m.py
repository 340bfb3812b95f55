"""gru4rec on ml1m with the paper's settings (Tan et al., Sec. 5.3). MovieLens-1M in the SASRec format (kang205/SASRec data/ml-1m.txt, 'user item' lines).

  export CAT_DATA_DIR=../shared/data     # or pass --config.data.path=...
  python launch.py --config=configs/gru4rec_ml1m.py --workdir=runs/gru4rec_ml1m
  python launch.py --config=configs/gru4rec_ml1m.py:method=linear,seed=1
"""

from cat_jax import config_lib


def get_config(arg=None):
  return config_lib.paper_config("gru4rec", "ml1m", arg)
