"""The train state, the loss, and the compiled train and eval steps.

Batches are dicts of int32 [batch, seq] arrays: "tokens", "segment_ids" (0 = padding, 1, 2, ...
= the packed documents of a row) and "positions" (restarting at 0 in each document). Token t
predicts token t + 1 only when both belong to the same document (same non-zero segment id), so
neither padding nor a document boundary contributes to the loss, and attention never crosses
documents (the decoder masks by segment id).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from model.decoder import Decoder, abstract_params, init_params
from sharding import activation_sharding, param_shardings, partition_spec
from training.optim import opt_state_shardings

BATCH_KEYS = ("tokens", "segment_ids", "positions")


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and replaces. rng is raw uint32 key data ([2]) so that checkpoints
    store it as a plain array; each step splits it and hands the model a fresh key."""

    step: jax.Array        # int32 scalar: optimizer updates done
    params: Any            # float32 master weights (param_dtype)
    opt_state: Any
    rng: jax.Array


def target_mask(segment_ids_bt):
    """float32 [B, T-1]: 1 where token t+1 is a valid target of position t (same document)."""
    same = segment_ids_bt[:, 1:] == segment_ids_bt[:, :-1]
    return (same & (segment_ids_bt[:, :-1] > 0)).astype(jnp.float32)


def loss_sums(model: Decoder, params, batch, rng, z_loss: float = 0.0):
    """Summed (not averaged) losses of one batch: (objective, (ce_sum, z_sum, aux)).

    objective = ce_sum + z_loss * z_sum (+ the MoE router loss times the number of targets);
    dividing by the number of targets gives the mean per token, so sums over micro-batches
    add up to exactly the loss of the whole batch.
    """
    tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
    variables = {"params": params}
    if model.config.is_moe:
        from model.moe import router_aux_loss
        (logits, _), state = model.apply(variables, tokens, pos, segment_ids_bt=seg,
                                         mutable=["intermediates"], rngs={"dropout": rng})
        aux = router_aux_loss(state.get("intermediates", {}))
    else:
        logits, _ = model.apply(variables, tokens, pos, segment_ids_bt=seg, rngs={"dropout": rng})
        aux = jnp.float32(0.0)
    logits_btv = logits[:, :-1].astype(jnp.float32)
    targets_bt = tokens[:, 1:]
    mask_bt = target_mask(seg)
    log_z_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    ce_sum = jnp.sum((log_z_bt - target_logit_bt) * mask_bt)
    z_sum = jnp.sum(jnp.square(log_z_bt) * mask_bt)
    n = jnp.sum(mask_bt)
    objective = ce_sum + z_loss * z_sum + model.config.router_aux_loss_coef * aux * n
    return objective, (ce_sum, z_sum, aux)


def split_micro_batches(batch, k: int):
    """[B, T] -> [k, B/k, T]; micro-batch i takes rows i, i+k, ... so that each micro-batch keeps
    the batch's split over the data-parallel devices (their contiguous row blocks)."""
    def split(x):
        b = x.shape[0]
        return x.reshape(b // k, k, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, batch)


def make_train_step(model: Decoder, tx: optax.GradientTransformation, schedule: Callable,
                    micro_batches: int = 1, z_loss: float = 0.0):
    """The pure train step (state, batch) -> (state, metrics); jit it with `compile_train_step`.

    With micro_batches = k the batch is split into k micro-batches whose gradients are summed in a
    lax.scan inside the step (activation memory of one micro-batch), then one update is applied:
    the same update as one batch of k times the size. Metrics are float32 scalars: loss (mean
    cross-entropy per target token), z_loss, aux_loss, grad_norm (before clipping), lr, tokens.
    """
    grad_fn = jax.grad(lambda p, b, r: loss_sums(model, p, b, r, z_loss), has_aux=True)

    def step_fn(state: TrainState, batch):
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
        n_targets = jnp.maximum(jnp.sum(target_mask(batch["segment_ids"])), 1.0)
        if micro_batches == 1:
            grads, (ce_sum, z_sum, aux) = grad_fn(state.params, batch, step_rng)
        else:
            micro = split_micro_batches(batch, micro_batches)
            rngs = jax.random.split(step_rng, micro_batches)

            def body(acc, xs):
                mb, r = xs
                g, sums = grad_fn(state.params, mb, r)
                return jax.tree.map(jnp.add, acc, (g, sums)), None

            zero = (jax.tree.map(jnp.zeros_like, state.params),
                    (jnp.float32(0), jnp.float32(0), jnp.float32(0)))
            (grads, (ce_sum, z_sum, aux)), _ = jax.lax.scan(body, zero, (micro, rngs))
            aux = aux / micro_batches
        grads = jax.tree.map(lambda g: g / n_targets, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": ce_sum / n_targets, "z_loss": z_sum / n_targets, "aux_loss": aux,
                   "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step),
                   "tokens": n_targets}
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                               rng=jax.random.key_data(rng))
        return new_state, metrics

    return step_fn


def make_eval_step(model: Decoder):
    """(params, batch) -> (ce_sum, n_targets): summed so eval batches combine exactly."""
    def eval_fn(params, batch):
        _, (ce_sum, _, _) = loss_sums(model, params, batch, jax.random.key(0))
        return ce_sum, jnp.sum(target_mask(batch["segment_ids"]))
    return eval_fn


class Shardings:
    """The layout of a run: the mesh, fitted rules, and the shardings of the state and batches."""

    def __init__(self, model: Decoder, tx: optax.GradientTransformation, mesh, rules):
        self.mesh, self.rules = mesh, rules
        self.replicated = NamedSharding(mesh, PartitionSpec())
        boxed = abstract_params(model)
        self.params = param_shardings(boxed, mesh, rules)
        abstract = jax.tree.map(lambda b: jax.ShapeDtypeStruct(b.value.shape, b.value.dtype),
                                boxed, is_leaf=lambda x: hasattr(x, "names"))
        self.abstract_params = abstract
        self.abstract_opt_state = jax.eval_shape(tx.init, abstract)
        self.opt_state = opt_state_shardings(tx, self.abstract_opt_state, self.params,
                                             self.replicated)
        self.state = TrainState(step=self.replicated, params=self.params,
                                opt_state=self.opt_state, rng=self.replicated)

    def batch(self, batch_size: int, seq_len: int) -> NamedSharding:
        spec = partition_spec(("batch", "length"), (batch_size, seq_len), self.mesh, self.rules,
                              "batch")
        return NamedSharding(self.mesh, spec)

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs carrying this layout's shardings: the restore target."""
        def sds(x, s):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
        return TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated),
            params=jax.tree.map(sds, self.abstract_params, self.params),
            opt_state=jax.tree.map(sds, self.abstract_opt_state, self.opt_state),
            rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=self.replicated))


def init_state(model: Decoder, tx, shardings: Shardings, seed: int, params=None) -> TrainState:
    """A fresh state on the mesh: random parameters from `seed` (or the given placed `params`)."""
    init_rng, state_rng = jax.random.split(jax.random.key(seed))
    if params is None:
        with activation_sharding(shardings.mesh, shardings.rules):
            params = init_params(model, init_rng, shardings.params)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    # jit with out_shardings (not device_put) so this also works when the mesh spans processes
    rng = jax.jit(lambda: jax.random.key_data(state_rng), out_shardings=shardings.replicated)()
    step = jax.jit(lambda: jnp.int32(0), out_shardings=shardings.replicated)()
    return TrainState(step=step, params=params, opt_state=opt_state, rng=rng)


def compile_train_step(step_fn, shardings: Shardings, batch_sharding):
    """jit with the layout's in/out shardings; the state is donated (updated in place)."""
    batch_sh = {k: batch_sharding for k in BATCH_KEYS}
    jitted = jax.jit(step_fn, in_shardings=(shardings.state, batch_sh),
                     out_shardings=(shardings.state, shardings.replicated), donate_argnums=0)

    def run(state, batch):
        with activation_sharding(shardings.mesh, shardings.rules):
            return jitted(state, batch)
    run.jitted = jitted
    return run


def compile_eval_step(eval_fn, shardings: Shardings, batch_sharding):
    batch_sh = {k: batch_sharding for k in BATCH_KEYS}
    jitted = jax.jit(eval_fn, in_shardings=(shardings.params, batch_sh),
                     out_shardings=shardings.replicated)

    def run(params, batch):
        with activation_sharding(shardings.mesh, shardings.rules):
            return jitted(params, batch)
    return run

