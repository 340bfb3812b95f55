"""Item-replacement attacks on test-time inputs (Tan et al., Fig. 5 and 6).

The rules live here; `robustness.evaluate_robustness` ranks the attacked
inputs and reports the drops.

The attack changes real inputs, not embeddings: in a user's left-padded input
window, the item at chosen positions is replaced by another real item, and the
model is ranked again with the same full-ranking protocol as clean evaluation.

Positions (Fig. 5: one item; Fig. 6: the last K items):
  first     the first real (non-padding) item of the window,
  middle    the real item at offset (L - 1) // 2 from the first one, L = the
            number of real items (the lower middle when L is even),
  last      the last K positions (K = 1 for the single-item attack).
Positions beyond the real items (windows shorter than K) are left alone.
With anchor 'window' (not the default), 'first' and 'middle' are instead the
fixed positions 0 and (T - 1) // 2 of the T-wide left-padded input window,
attacked only where they hold a real item: a reading of Fig. 5 in which
"the first item" is the first input slot, so that the many users with fewer
than T (or T/2) items keep their input unchanged and count with a zero drop.

Replacements (mode). g = d/de [-log s(<W_T, E_target>)] is the gradient of
the target's BCE ranking loss at the replaced item's embedding e, taken at
the clean input for all K positions:
  minimal   (default; Sec. 5.6: "a gradient-based attack on target item
            embeddings and then pairing with the nearest items in the
            gradient direction", replacements "near the original in the
            embedding space for minimal perturbation"): among the allowed j
            whose displacement E_j - e has positive cosine with g, the one
            nearest to the original, min ||E_j - e||. One rule for every
            model, no step size. A position where no allowed item lies in
            the gradient direction (or g = 0) is left alone.
  cosine    as `minimal`, but "near" in angle: among the same allowed j in
            the gradient direction, the one of largest cosine similarity
            <E_j, e> / (||E_j|| ||e||) with the original. L2 nearness
            favours items of small norm (rarely trained items sit near the
            origin, close to everything), which carry little signal; the
            angle ignores the norm.
  step      the allowed j nearest to a gradient step, minimizing
            ||E_j - (e + alpha * g / ||g||)|| (alpha: by default the median
            nearest-neighbour distance of the item table). This was the
            attack before issue 12, then called 'gradient' (still accepted).
  snap      as `step`, but the original item competes: a position keeps its
            item when the step point is nearer to it than to every allowed
            item, so a small alpha changes few items ("replaced" reports
            how many). A reading of Sec. 5.6 in which "pairing with the
            nearest items in the gradient direction" may return the item
            itself; used to ask which step size gives the paper's Fig. 5.
  random    uniform over the allowed items (from an explicit PRNG key).
An item is allowed unless it is padding, in the window (so not the original),
the target, in the user's training history or the extra excluded item (the
validation item at test time). The K replacements of one window are distinct:
positions pick in turn, latest first, and each pick leaves the allowed set.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cat_jax import adversarial, evaluate

POSITIONS = ("first", "middle", "last")
# What 'first' and 'middle' are counted from (module docstring).
ANCHORS = ("items", "window")
MODES = ("minimal", "cosine", "step", "snap", "random")
# Older names of the modes, still accepted (RESULTS.md's commands use them).
MODE_ALIASES = {"gradient": "step"}
# The modes that take a gradient step of size alpha.
STEP_MODES = ("step", "snap")


def resolve_mode(mode: str) -> str:
  """The mode name in MODES for `mode` (an alias maps to its mode)."""
  mode = MODE_ALIASES.get(mode, mode)
  if mode not in MODES:
    raise ValueError(f"Unknown attack mode {mode!r}; choose one of "
                     f"{MODES} (or the alias 'gradient' of 'step').")
  return mode


def attack_positions(inputs: jax.Array, where: str, k: int = 1,
                     window: int | None = None
                     ) -> tuple[jax.Array, jax.Array]:
  """Window positions to replace, for left-padded windows.

  Args:
    inputs: [B, T] int, left-padded windows (0 = padding).
    where: 'first', 'middle' or 'last' (see the module docstring).
    k: number of positions; only 'last' takes k > 1.
    window: None (anchor 'items': 'first'/'middle' of the real items), or
      the width W >= T of the full input window whose last T columns
      `inputs` are (anchor 'window'; W = T without length buckets):
      'first'/'middle' are then its fixed positions 0 and (W - 1) // 2.

  Returns:
    (positions [B, k] int32 in 0..T-1, valid [B, k] bool). A position is
    valid where it holds a real item; invalid ones are never replaced.
  """
  T = inputs.shape[1]
  if where not in POSITIONS:
    raise ValueError(f"Unknown position {where!r}; choose one of {POSITIONS}.")
  if not 1 <= k <= T:
    raise ValueError(f"k must be in 1..{T} (the window length), got {k}.")
  if k > 1 and where != "last":
    raise ValueError(f"Only 'last' replaces several items, got {where!r}, "
                     f"k={k}.")
  if window is not None and window < T:
    raise ValueError(f"window ({window}) must be at least the width of the "
                     f"inputs ({T}).")
  length = jnp.sum(inputs > 0, axis=1, dtype=jnp.int32)
  start = T - length  # left padding: the real items are [T - L, T)
  if window is not None and where != "last":
    # The full window's slot, in the columns of `inputs` (negative when it
    # lies in the columns a length bucket cut off, which hold padding).
    slot = (0 if where == "first" else (window - 1) // 2) - (window - T)
    # slot <= T - 1, so slot >= start implies a non-empty window.
    pos = jnp.full((inputs.shape[0], 1), slot, jnp.int32)
    return jnp.clip(pos, 0, T - 1), pos >= start[:, None]
  if where == "first":
    pos = start[:, None]
  elif where == "middle":
    pos = (start + jnp.maximum(length - 1, 0) // 2)[:, None]
  else:
    pos = jnp.broadcast_to(jnp.arange(T - k, T, dtype=jnp.int32),
                           (inputs.shape[0], k))
  pos = jnp.minimum(pos, T - 1)  # an empty window has start = T
  return pos, (pos >= start[:, None]) & (length[:, None] > 0)


def allowed_replacements(inputs: jax.Array, targets: jax.Array,
                         history_rows: jax.Array, extra: jax.Array,
                         num_items: int) -> jax.Array:
  """[B, N+1] bool: the items that may replace an item of each window.

  Args:
    inputs: [B, T] windows (0 = padding); their items are not allowed.
    targets: [B] target items; not allowed.
    history_rows: [B, H] training histories (padded with N+1); not allowed.
    extra: [B] one more item per row that is not allowed (0 for none).
    num_items: N.
  """
  rows = jnp.arange(inputs.shape[0])
  taken = evaluate.history_mask(history_rows, extra, num_items)
  taken = taken.at[rows[:, None], inputs].set(True)
  taken = taken.at[rows, targets].set(True)
  return (~taken).at[:, 0].set(False)


def target_gradient(model, params, inputs: jax.Array,
                    targets: jax.Array) -> jax.Array:
  """[B, T, d]: d/dS of each row's -log s(<W_T, E_target>), S = embed(inputs).

  Rows do not interact in the encoder, so the gradient of the sum over rows
  is each row's own gradient. The model runs in evaluation mode.
  """
  mask = inputs > 0
  target_emb = model.items(params)[targets]

  def loss(S):
    W = model.encode(params, S, mask, train=False)[:, -1]
    return jnp.sum(jax.nn.softplus(-jnp.sum(W * target_emb, axis=-1)))

  return jax.grad(loss)(model.embed(params, inputs))


def squared_distances(table: jax.Array, points: jax.Array) -> jax.Array:
  """[..., N+1]: ||table_j - x||^2 - ||x||^2 for each point x [..., d].

  One matrix product; ||x||^2 is constant per point and so left out, as only
  the argmin over j is used. HIGHEST precision keeps TF32/bf16 matmuls on
  accelerators from reordering close neighbours.
  """
  dots = jnp.einsum("...d,nd->...n", points, table,
                    precision=jax.lax.Precision.HIGHEST)
  return jnp.sum(jnp.square(table), axis=-1) - 2.0 * dots


def pick_distinct(cost: jax.Array, allowed: jax.Array,
                  valid: jax.Array, keep_cost: jax.Array | None = None
                  ) -> jax.Array:
  """Lowest-cost allowed item per position, distinct within a row.

  Args:
    cost: [B, K, N+1] float, cost of putting item j at position k; +inf
      means that j may not go to that position.
    allowed: [B, N+1] bool.
    valid: [B, K] bool; invalid positions pick nothing.
    keep_cost: optional [B, K] cost of keeping the original item; a
      position whose best allowed item does not cost strictly less picks
      nothing (and leaves that item to the other positions).

  Returns:
    [B, K] int32 items, 0 where nothing is picked (invalid position, or no
    allowed item of finite cost left). Positions pick from the last
    (k = K-1) to the first, so the most recent item, which moves the
    ranking most, chooses first.
  """
  rows = jnp.arange(cost.shape[0])
  picks = [None] * cost.shape[1]
  for k in reversed(range(cost.shape[1])):
    c = jnp.where(allowed, cost[:, k], jnp.inf)
    j = jnp.argmin(c, axis=-1)
    ok = valid[:, k] & allowed[rows, j] & jnp.isfinite(c[rows, j])
    if keep_cost is not None:
      ok = ok & (c[rows, j] < keep_cost[:, k])
    picks[k] = jnp.where(ok, j, 0).astype(jnp.int32)
    allowed = allowed.at[rows, j].set(allowed[rows, j] & ~ok)
  return jnp.stack(picks, axis=1)


def replace_items(inputs: jax.Array, positions: jax.Array,
                  items: jax.Array) -> jax.Array:
  """[B, T]: inputs with items [B, K] written at positions [B, K] (0 = keep)."""
  rows = jnp.arange(inputs.shape[0])[:, None]
  old = inputs[rows, positions]
  return inputs.at[rows, positions].set(jnp.where(items > 0, items, old))


def minimal_cost(table: jax.Array, points: jax.Array,
                 grads: jax.Array) -> jax.Array:
  """[..., N+1] cost of the `minimal` rule (module docstring).

  ||E_j - e||^2 - ||e||^2 where <E_j - e, g> > 0 (positive cosine between
  the displacement and the gradient), +inf elsewhere (also everywhere when
  g = 0).

  Args:
    table: [N+1, d] item embeddings E.
    points: [..., d] original embeddings e.
    grads: [..., d] gradients g at e.
  """
  return jnp.where(along_gradient(table, points, grads),
                   squared_distances(table, points), jnp.inf)


def along_gradient(table: jax.Array, points: jax.Array,
                   grads: jax.Array) -> jax.Array:
  """[..., N+1] bool: <E_j - e, g> > 0 (shapes as `minimal_cost`)."""
  along = (jnp.einsum("...d,nd->...n", grads, table,
                      precision=jax.lax.Precision.HIGHEST)
           - jnp.sum(grads * points, axis=-1, keepdims=True))
  return along > 0


def cosine_cost(table: jax.Array, points: jax.Array,
                grads: jax.Array) -> jax.Array:
  """[..., N+1] cost of the `cosine` rule: -cos(E_j, e) where
  <E_j - e, g> > 0, +inf elsewhere. Shapes as `minimal_cost`."""
  along = along_gradient(table, points, grads)
  dots = jnp.einsum("...d,nd->...n", points, table,
                    precision=jax.lax.Precision.HIGHEST)
  norms = (jnp.linalg.norm(points, axis=-1, keepdims=True)
           * jnp.linalg.norm(table, axis=-1))
  return jnp.where(along, -dots / jnp.maximum(norms, 1e-30), jnp.inf)


def minimal_replacements(model, params, inputs: jax.Array,
                         targets: jax.Array, positions: jax.Array,
                         valid: jax.Array, allowed: jax.Array,
                         cost_fn=minimal_cost) -> jax.Array:
  """[B, K] nearest allowed items in the gradient direction (0 = none).

  Mode `minimal` (Sec. 5.6; module docstring): position k of row b takes
  the allowed j with <E_j - e, g> > 0 nearest to e, distinct within a row
  (`pick_distinct`), g from `target_gradient` at the clean input.
  cost_fn: `minimal_cost` (default, L2 nearness) or `cosine_cost`.

  Args:
    model, params: the attacked model.
    inputs: [B, T] clean windows; targets: [B] items.
    positions, valid: [B, K] from `attack_positions`.
    allowed: [B, N+1] from `allowed_replacements`.
  """
  rows = jnp.arange(inputs.shape[0])[:, None]
  g = target_gradient(model, params, inputs, targets)[rows, positions]
  table = model.items(params)
  points = table[inputs[rows, positions]]
  return pick_distinct(cost_fn(table, points, g), allowed, valid)


def step_replacements(model, params, inputs: jax.Array,
                      targets: jax.Array, positions: jax.Array,
                      valid: jax.Array, allowed: jax.Array,
                      alpha, keep: bool = False) -> jax.Array:
  """[B, K] items nearest to e + alpha * g / ||g|| (mode `step`; 0 = none).

  keep: mode `snap`: the original item competes, and a position whose
  original is at least as near to the step point as every allowed item is
  left alone (0).

  Args:
    model, params: the attacked model.
    inputs: [B, T] clean windows; targets: [B] items.
    positions, valid: [B, K] from `attack_positions`.
    allowed: [B, N+1] from `allowed_replacements`.
    alpha: step size in embedding space (scalar).
  """
  rows = jnp.arange(inputs.shape[0])[:, None]
  g = target_gradient(model, params, inputs, targets)[rows, positions]
  table = model.items(params)
  originals = inputs[rows, positions]
  points = table[originals] + alpha * adversarial.l2_normalize(g, axes=-1)
  cost = squared_distances(table, points)
  keep_cost = (jnp.take_along_axis(cost, originals[..., None], axis=-1)[..., 0]
               if keep else None)
  return pick_distinct(cost, allowed, valid, keep_cost)


def random_replacements(rng: jax.Array, valid: jax.Array,
                        allowed: jax.Array) -> jax.Array:
  """[B, K] items drawn uniformly from the allowed ones, distinct per row.

  The argmin of i.i.d. uniform costs over the allowed items is uniform over
  them, so this shares `pick_distinct` with the gradient attacks.
  """
  B, K = valid.shape
  cost = jax.random.uniform(rng, (B, K, allowed.shape[1]))
  return pick_distinct(cost, allowed, valid)


def attack_batch(model, params, inputs: jax.Array, targets: jax.Array,
                 history_rows: jax.Array, extra: jax.Array,
                 positions: jax.Array, valid: jax.Array, alpha, rng,
                 num_items: int, mode: str = "minimal") -> jax.Array:
  """[B, T] attacked windows of one batch (see the module docstring).

  Args:
    inputs: [B, T]; targets, extra: [B]; history_rows: [B, H].
    positions, valid: [B, K] from `attack_positions`.
    alpha: gradient step (modes 'step', 'snap'); rng: key (mode 'random').
    mode: 'minimal', 'cosine', 'step', 'snap' or 'random' (`MODES`, or an
      alias).
  """
  mode = resolve_mode(mode)
  allowed = allowed_replacements(inputs, targets, history_rows, extra,
                                 num_items)
  if mode in ("minimal", "cosine"):
    items = minimal_replacements(
        model, params, inputs, targets, positions, valid, allowed,
        minimal_cost if mode == "minimal" else cosine_cost)
  elif mode in STEP_MODES:
    items = step_replacements(model, params, inputs, targets, positions,
                              valid, allowed, alpha, keep=mode == "snap")
  else:
    items = random_replacements(rng, valid, allowed)
  return replace_items(inputs, positions, items)


def make_attack(model, num_items: int, batch_size: int,
                mode: str = "minimal"):
  """Jitted `attack(params, ...) -> [E, T]`: the attacked windows of E users.

  Args of the returned function, in order:
    params, inputs [E, T], targets [E], users [E], extra [E], history [U, H]:
      as for `evaluate.make_ranker`.
    positions, valid: [E, K] from `attack_positions`.
    alpha: gradient step (scalar; used by modes 'step' and 'snap').
    rng: PRNG key (mode 'random'); batch i uses fold_in(rng, i).
  Users go `batch_size` at a time through a `lax.map`, with one matrix
  product over the catalog per batch. It compiles once per K.
  """
  mode = resolve_mode(mode)

  @jax.jit
  def attack(params, inputs, targets, users, extra, history, positions,
             valid, alpha, rng):
    # Batch-padding rows have no valid position, so they are never changed.
    def one(b, x, t, u, e, p, v):
      return attack_batch(model, params, x, t, history[u], e, p, v, alpha,
                          jax.random.fold_in(rng, b), num_items, mode)

    return evaluate.map_batches(
        one, (inputs, targets, users, extra, positions, valid), batch_size)

  return attack


@functools.partial(jax.jit, static_argnames="block_size")
def median_nn_distance(table: jax.Array, block_size: int = 1024) -> jax.Array:
  """Median over items 1..N of the L2 distance to their nearest other item.

  Args:
    table: [N+1, d] item embeddings, row 0 = padding (ignored).
    block_size: rows per distance block, so memory is block_size * N.

  Returns:
    scalar float32 (the default step alpha of modes 'step' and 'snap').
  """
  items = table[1:]
  n = items.shape[0]
  nb = -(-n // block_size)
  # The last block is filled with repeats of item n-1, cut off below.
  rows = jnp.minimum(jnp.arange(nb * block_size), n - 1).reshape(
      nb, block_size)
  sq = jnp.sum(jnp.square(items), axis=-1)

  def one(r):
    d2 = sq[r][:, None] + squared_distances(items, items[r])
    d2 = jnp.where(r[:, None] == jnp.arange(n)[None, :], jnp.inf, d2)
    return jnp.sqrt(jnp.maximum(jnp.min(d2, axis=-1), 0.0))

  return jnp.median(jax.lax.map(one, rows).reshape(-1)[:n])
