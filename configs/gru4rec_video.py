"""gru4rec on video with the paper's settings (Tan et al., Sec. 5.1). The Amazon Video Games 5-core set (paper Table 1: 24,303 users, 10,672 items).

  export CAT_DATA_DIR=../shared/data     # or pass --config.data.path=...
  python launch.py --config=configs/gru4rec_video.py --workdir=runs/gru4rec_video
  python launch.py --config=configs/gru4rec_video.py:method=linear,seed=1
"""

from cat_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, method="cas", eps=10.0, seed=0, path="Video.txt")
  c = config_lib.base_config()
  c.seed = a.seed
  c.data.name = "file"
  c.data.path = a.path
  c.data.max_len = 50
  c.model.name = "gru4rec"
  c.adv.method = a.method
  c.adv.eps = a.eps
  return c
