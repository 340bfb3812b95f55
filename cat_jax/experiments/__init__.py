"""Runners for the paper's experiments; each is `python -m cat_jax.experiments.<name>`."""
