"""sasrec on ml1m with the paper's settings (Tan et al., Sec. 5.3). MovieLens-1M in the SASRec format (kang205/SASRec data/ml-1m.txt, 'user item' lines).

  export CAT_DATA_DIR=../shared/data     # or pass --config.data.path=...
  python launch.py --config=configs/sasrec_ml1m.py --workdir=runs/sasrec_ml1m
  python launch.py --config=configs/sasrec_ml1m.py:method=linear,seed=1
"""

from cat_jax import config_lib


def get_config(arg=None):
  return config_lib.paper_config("sasrec", "ml1m", arg)
