"""SASRec and GRU4Rec as Flax linen modules, exposed as pure functions.

The paper (Tan et al., Sec. 3) splits a sequential recommender into
  S = embed(item_ids)                  [B, T, d]  sequence item embeddings,
  W = encode(S, mask)                  [B, T, d]  user embedding at each step,
  score(u, j) = <W_u, E_j>                         with the shared item table E.
Adversarial training perturbs S (level 1) and W, E_pos, E_neg (level 2), so
`Model` hands out exactly these three functions of (params, ...).

Precision: with `dtype=jnp.bfloat16` the encoder's layers compute in bf16;
the parameters, the item table, S and the returned W stay float32, so the
losses, the perturbations and the ranking scores are float32 in any case.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

_emb_init = nn.initializers.glorot_normal()


class SASRecModule(nn.Module):
  """Self-attentive sequential recommender (Kang & McAuley, 2018)."""
  num_items: int
  max_len: int
  hidden: int = 100
  num_blocks: int = 2
  num_heads: int = 1
  dropout: float = 0.2
  dtype: Any = jnp.float32

  def setup(self):
    self.item_emb = nn.Embed(self.num_items + 1, self.hidden,
                             embedding_init=_emb_init, name="item_emb")
    self.pos_emb = nn.Embed(self.max_len, self.hidden,
                            embedding_init=_emb_init, name="pos_emb")
    ln = lambda: nn.LayerNorm(epsilon=1e-8, dtype=self.dtype)
    self.attn_ln = [ln() for _ in range(self.num_blocks)]
    self.attn = [
        nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, qkv_features=self.hidden,
            out_features=self.hidden, dropout_rate=self.dropout,
            dtype=self.dtype)
        for _ in range(self.num_blocks)]
    self.ffn_ln = [ln() for _ in range(self.num_blocks)]
    self.ffn1 = [nn.Dense(self.hidden, dtype=self.dtype)
                 for _ in range(self.num_blocks)]
    self.ffn2 = [nn.Dense(self.hidden, dtype=self.dtype)
                 for _ in range(self.num_blocks)]
    self.drop = nn.Dropout(self.dropout)
    self.last_ln = ln()

  def embed(self, item_ids):
    return self.item_emb(item_ids)

  def items(self):
    return self.item_emb.embedding

  def encode(self, S, mask, train: bool = False, segments=None,
             positions=None):
    det = not train
    T = S.shape[1]
    if T > self.max_len:
      raise ValueError(f"SASRec window of {T} > max_len {self.max_len}")
    m = mask[..., None].astype(self.dtype)
    if positions is None:
      # Windows are right-aligned: the last item always has position
      # max_len - 1, so a window cut to its last T items (a length bucket)
      # gets the positions it has inside the full left-padded window.
      pos = self.pos_emb(jnp.arange(self.max_len - T, self.max_len))[None]
    else:  # packed rows: each token's position in its own window
      pos = self.pos_emb(positions)
    x = S * (self.hidden ** 0.5) + pos
    x = self.drop(x.astype(self.dtype), deterministic=det) * m
    # Causal attention that also ignores padding keys (left padding) and,
    # in packed rows, the keys of other sequences.
    masks = [nn.make_causal_mask(mask, dtype=jnp.bool_),
             nn.make_attention_mask(jnp.ones_like(mask), mask,
                                    dtype=jnp.bool_)]
    if segments is not None:
      masks.append(nn.make_attention_mask(segments, segments, jnp.equal,
                                          dtype=jnp.bool_))
    attn_mask = nn.combine_masks(*masks)
    for b in range(self.num_blocks):
      q = self.attn_ln[b](x)
      x = q + self.attn[b](q, x, mask=attn_mask, deterministic=det)
      x = self.ffn_ln[b](x)
      h = self.drop(nn.relu(self.ffn1[b](x)), deterministic=det)
      x = x + self.drop(self.ffn2[b](h), deterministic=det)
      x = x * m
    return self.last_ln(x).astype(S.dtype)

  def __call__(self, item_ids, train: bool = False):
    return self.encode(self.embed(item_ids), item_ids > 0, train)


class GRU4RecModule(nn.Module):
  """GRU4Rec (Hidasi et al., 2016): embedding, dropout, one GRU layer.

  The recurrence skips padding steps (the state stays at zero until the
  first real item), so left padding does not change the user embedding.
  """
  num_items: int
  max_len: int
  hidden: int = 100
  dropout: float = 0.2
  dtype: Any = jnp.float32

  def setup(self):
    self.item_emb = nn.Embed(self.num_items + 1, self.hidden,
                             embedding_init=_emb_init, name="item_emb")
    self.cell = nn.GRUCell(self.hidden, dtype=self.dtype, name="gru")
    self.drop = nn.Dropout(self.dropout)

  def embed(self, item_ids):
    return self.item_emb(item_ids)

  def items(self):
    return self.item_emb.embedding

  def encode(self, S, mask, train: bool = False, segments=None,
             positions=None):
    del positions  # a recurrence has no position embedding
    x = self.drop(S, deterministic=not train).astype(self.dtype)

    def step(cell, carry, inputs):
      x_t, m_t = inputs[:2]
      if len(inputs) == 3:  # packed rows: a new sequence starts afresh
        carry = jnp.where(inputs[2][:, None], 0.0, carry).astype(carry.dtype)
      new, _ = cell(carry, x_t)
      new = jnp.where(m_t[:, None], new, carry)
      return new, new

    scan = nn.scan(step, variable_broadcast="params",
                   split_rngs={"params": False}, in_axes=1, out_axes=1)
    carry = jnp.zeros((S.shape[0], self.hidden), self.dtype)
    inputs = (x, mask)
    if segments is not None:
      starts = jnp.concatenate(
          [jnp.ones_like(segments[:, :1], jnp.bool_),
           segments[:, 1:] != segments[:, :-1]], axis=1)
      inputs = (x, mask, starts)
    _, W = scan(self.cell, carry, inputs)
    return (W * mask[..., None].astype(W.dtype)).astype(S.dtype)

  def __call__(self, item_ids, train: bool = False):
    return self.encode(self.embed(item_ids), item_ids > 0, train)


class Model(NamedTuple):
  """A sequential recommender as pure functions of its parameters.

  init(rng, item_ids [B, T]) -> params
  embed(params, item_ids [B, T]) -> S [B, T, d]
  encode(params, S [B, T, d], mask [B, T] bool, *, train, rng,
         segments=None, positions=None) -> W [B, T, d]
  items(params) -> E [N+1, d]  (row 0 = padding)

  Windows are left-padded and right-aligned: any T <= max_len works, and a
  window's last T' columns give the same outputs at its real positions as
  the whole window (dropout aside), which is what length buckets use.

  Packed rows (`packing`) hold several sequences: `segments` [B, T] int
  gives each token the id of its sequence (attention stays within one; the
  GRU restarts at each new id) and `positions` [B, T] int each token's
  column in its own right-aligned window; every sequence then gives what
  its own window gives (dropout aside).
  """
  init: Callable[..., Any]
  embed: Callable[..., jax.Array]
  encode: Callable[..., jax.Array]
  items: Callable[..., jax.Array]
  module: nn.Module


MODELS = ("sasrec", "gru4rec")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(cfg, num_items: int, max_len: int) -> Model:
  """Builds `cfg.name` in MODELS from a `config.model` ConfigDict."""
  name = cfg.get("dtype", "float32")
  if name not in DTYPES:
    raise ValueError(f"Unknown model.dtype {name!r}; choose one of "
                     f"{tuple(DTYPES)}.")
  dtype = DTYPES[name]
  if cfg.name == "sasrec":
    module = SASRecModule(num_items=num_items, max_len=max_len,
                          hidden=cfg.hidden, num_blocks=cfg.num_blocks,
                          num_heads=cfg.num_heads, dropout=cfg.dropout,
                          dtype=dtype)
  elif cfg.name == "gru4rec":
    module = GRU4RecModule(num_items=num_items, max_len=max_len,
                           hidden=cfg.hidden, dropout=cfg.dropout, dtype=dtype)
  else:
    raise ValueError(f"Unknown model.name {cfg.name!r}; choose one of {MODELS}.")
  return model_functions(module)


def model_functions(module: nn.Module) -> Model:
  """Wraps a module with `embed`, `encode`, `items` methods as pure functions."""

  def init(rng, item_ids):
    return module.init(rng, item_ids)["params"]

  def embed(params, item_ids):
    return module.apply({"params": params}, item_ids, method="embed")

  def encode(params, S, mask, *, train=False, rng=None, segments=None,
             positions=None):
    if train and rng is None:
      raise ValueError("encode(train=True) needs a dropout rng")
    rngs = {"dropout": rng} if train else {}
    return module.apply({"params": params}, S, mask, train, segments,
                        positions, method="encode", rngs=rngs)

  def items(params):
    return module.apply({"params": params}, method="items")

  return Model(init=init, embed=embed, encode=encode, items=items,
               module=module)
