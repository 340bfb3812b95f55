"""gru4rec on video with the paper's settings (Tan et al., Sec. 5.3). The Amazon Video Games 5-core set (paper Table 1: 24,303 users, 10,672 items).

  export CAT_DATA_DIR=../shared/data     # or pass --config.data.path=...
  python launch.py --config=configs/gru4rec_video.py --workdir=runs/gru4rec_video
  python launch.py --config=configs/gru4rec_video.py:method=linear,seed=1
"""

from cat_jax import config_lib


def get_config(arg=None):
  return config_lib.paper_config("gru4rec", "video", arg)
