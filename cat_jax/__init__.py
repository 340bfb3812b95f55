"""cat_jax: cascade-guided adversarial training for sequential recommenders.

Tan et al., "Towards More Robust and Accurate Sequential Recommendation with
Cascade-guided Adversarial Training" (arXiv 2304.05492), in JAX/Flax.

Modules: data (readers, split, synthetic data), models (SASRec, GRU4Rec),
losses (BCE), sampling (negatives), cascade (Eq. 4.11), adversarial
(`adv_step`, methods), metrics and evaluate (full ranking), train (epochs,
phases, checkpoints), sharding (device mesh), robustness (item-replacement
attacks), stats, writer (JSON lines), config_lib (defaults), and the
experiment runners in cat_jax.experiments.
"""

__version__ = "0.1.0"
