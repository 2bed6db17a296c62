"""The model's compiled programs as (function, abstract arguments): for export and AOT checks.

`model_programs` builds the three programs every deployment runs (prefill, decode step, and a
training-style loss + gradient) from a config, an attention setting and shapes alone, with no
weights and no devices. Paired with an attention impl that names a target ("pallas:tpu",
"pallas:cuda"), they lower and compile for that target on a CPU-only machine
(scripts/check_kernels.py, tests/model/test_portability.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.decoder import Decoder, KVCache, abstract_params, decode_step, forward, prefill


@dataclass(frozen=True)
class ProgramShapes:
    """Shapes of one serving/training configuration (padded buckets, not live traffic)."""

    prefill_batch: int = 1
    prefill_len: int = 256
    decode_batch: int = 8
    train_batch: int = 2
    train_len: int = 256
    num_pages: int = 256
    page_size: int = 16
    pages_per_seq: int = 32


def next_token_loss(model: Decoder, params, tokens_bt, segment_ids_bt):
    """Mean next-token cross-entropy over positions whose target is in the same segment."""
    logits = forward(model, params, tokens_bt, segment_ids_bt=segment_ids_bt)[:, :-1]
    targets = tokens_bt[:, 1:]
    mask = (segment_ids_bt[:, 1:] == segment_ids_bt[:, :-1]) & (segment_ids_bt[:, 1:] > 0)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1)


def model_programs(config: ModelConfig, *, attention: str, dtype=jnp.bfloat16,
                   shapes: ProgramShapes = ProgramShapes()
                   ) -> dict[str, tuple[Callable, tuple[jax.ShapeDtypeStruct, ...]]]:
    """{"prefill" | "decode" | "train_grad": (function, abstract args)} for `config`.

    Parameters are inputs (abstract, in `dtype`), never baked-in constants. The KV cache is in
    `dtype`. The train program uses the stacked (nn.scan) layer layout and returns the loss and
    the gradients; serving programs use the unrolled layout serving runs with.
    """
    s, i32 = shapes, jnp.int32
    serve = Decoder(config, dtype=dtype, param_dtype=dtype, attention_impl=attention,
                    scan_layers=False)
    train = Decoder(config, dtype=dtype, param_dtype=jnp.float32, attention_impl=attention,
                    scan_layers=True, remat_policy="dots")

    def params_of(model):
        return nn.meta.unbox(abstract_params(model))

    cache_shape = KVCache.shape(config, s.num_pages, s.page_size)
    cache = KVCache(k=jax.ShapeDtypeStruct(cache_shape, dtype),
                    v=jax.ShapeDtypeStruct(cache_shape, dtype))

    def run_prefill(params, cache, tokens, positions, page_table, kv_lens, logits_at):
        return prefill(serve, params, tokens, positions, cache, page_table, kv_lens, logits_at)

    def run_decode(params, cache, tokens, positions, page_table):
        return decode_step(serve, params, tokens, positions, cache, page_table)

    def run_train(params, tokens, segment_ids):
        return jax.value_and_grad(lambda p: next_token_loss(train, p, tokens, segment_ids))(params)

    sds = jax.ShapeDtypeStruct
    pb, db = s.prefill_batch, s.decode_batch
    return {
        "prefill": (run_prefill, (params_of(serve), cache, sds((pb, s.prefill_len), i32),
                                  sds((pb, s.prefill_len), i32), sds((pb, s.pages_per_seq), i32),
                                  sds((pb,), i32), sds((pb,), i32))),
        "decode": (run_decode, (params_of(serve), cache, sds((db,), i32), sds((db,), i32),
                                sds((db, s.pages_per_seq), i32))),
        "train_grad": (run_train, (params_of(train), sds((s.train_batch, s.train_len), i32),
                                   sds((s.train_batch, s.train_len), i32))),
    }


# ---------------------------------------------------------------------------------------------
# Targets that are not attached: jax.export for a platform, deviceless compiles for a TPU slice.

CUSTOM_CALL_MARKERS = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


def export_for(fn: Callable, args, platform: str) -> jax.export.Exported:
    """jax.export `fn` at `args` for `platform` ("cpu" | "cuda" | "tpu"). Triton kernels are
    custom calls without jax.export's stability guarantee, so that one check is waived for
    them (an artifact is tied to the jax version that wrote it anyway)."""
    from model.kernels import cpu_ffi
    disabled = ([jax.export.DisabledSafetyCheck.custom_call(CUSTOM_CALL_MARKERS["cuda"])]
                if platform == "cuda" else [])
    with cpu_ffi.disabled():  # exported programs carry no library-bound CPU kernel
        return jax.export.export(jax.jit(fn), platforms=[platform],
                                 disabled_checks=disabled)(*args)


def count_kernels(exported: jax.export.Exported, platform: str) -> int:
    """Pallas kernel launches in an exported program's module text."""
    marker = CUSTOM_CALL_MARKERS.get(platform)
    return exported.mlir_module().count(marker) if marker else 0


def tpu_topology(name: str = "v5e:2x2"):
    """A deviceless TPU topology (needs the libtpu package; no chip). `name` is
    "<generation>:<chips>" as jax.experimental.topologies spells it, e.g. "v5e:2x2", "v5p:2x2x1"."""
    from jax.experimental import topologies
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise RuntimeError("compiling for a TPU topology without a chip needs the libtpu "
                           "package: pip install 'jax[tpu]'") from e
    dims = tuple(int(d) for d in name.split(":", 1)[1].split("x"))
    bounds = (dims + (1, 1, 1))[:3]
    return topologies.get_topology_desc(platform="tpu", topology_name=name,
                                        chip_config_name="default",
                                        chips_per_host_bounds=bounds, num_slices=1)


def compile_on_devices(fn: Callable, args, devices) -> jax.stages.Compiled:
    """Compile `fn` for `devices` (e.g. one chip of a deviceless topology), arguments
    replicated; returns the executable (memory_analysis, cost_analysis, as_text)."""
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    sharding = NamedSharding(Mesh(np.array(devices), ("x",)), PartitionSpec())
    placed = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                          args)
    return jax.jit(fn).lower(*placed).compile()
