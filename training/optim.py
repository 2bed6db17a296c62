"""The optimizer: AdamW with warmup and cosine/linear decay, a weight-decay mask, global-norm
clipping (optax), and the shardings of its state.

Weight decay applies to matrices only: norm scales and biases are left alone (decaying a norm's
scale towards 0 fights the normalization; biases have too few parameters to overfit with).
"""

from __future__ import annotations

import dataclasses

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")


class TrainConfigError(ValueError):
    """A training option is invalid; the message names the field and its limit."""


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW and its learning-rate schedule. Units: steps (optimizer updates), not micro-batches."""

    learning_rate: float = 3e-3      # peak, reached at the end of warmup
    warmup_steps: int = 20
    schedule: str = "cosine"         # decay after warmup: cosine | linear | constant
    min_lr_ratio: float = 0.1        # final learning rate = min_lr_ratio * learning_rate
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0    # global gradient norm limit (None: no clipping)

    def validate(self) -> "OptimConfig":
        if not self.learning_rate > 0:
            raise TrainConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise TrainConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.schedule not in SCHEDULES:
            raise TrainConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise TrainConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise TrainConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise TrainConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise TrainConfigError(f"clip_norm must be > 0 or None, got {self.clip_norm}")
        return self


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then decay to min_lr_ratio * peak at total_steps."""
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    warmup = min(cfg.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params):
    """True for parameters that get weight decay: everything except norm scales and biases."""
    def decays(path, _):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        return not (name.endswith("scale") or name.endswith("_bias") or "norm" in name)
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW (decoupled, masked weight decay) with the schedule."""
    adamw = optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state, param_shardings,
                        replicated):
    """Shardings of the optimizer state: moments like their parameter, counters replicated."""
    return optax.tree_map_params(tx, lambda _, sharding: sharding, abstract_opt_state,
                                 param_shardings, transform_non_params=lambda _: replicated)
