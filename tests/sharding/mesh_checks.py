"""Checks that need several devices or processes, run in a subprocess by tests/sharding.

JAX fixes its device count when its backend starts, so the pytest process (one CPU device) cannot
run them itself. Each mode writes a JSON report that the tests assert on:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding/mesh_checks.py matrix OUT
    XLA_FLAGS=... python tests/sharding/mesh_checks.py smollm2 OUT --mesh data=2,fsdp=2,tensor=2 --rules fsdp_tp
    python scripts/launch_local.py -n 2 --devices-per-process 4 -- \
        tests/sharding/mesh_checks.py multiprocess OUT --mesh data=2,fsdp=2,tensor=2 --rules fsdp_tp

OUT is a path prefix: OUT.json (and OUT.npz for arrays) are written by process 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import re
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent)]  # the repo (model, sharding) and tests/
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from model.config import get_preset  # noqa: E402
from model.decoder import Decoder, abstract_params, forward, init_params, logical_axes  # noqa: E402
from sharding import (activation_sharding, fetch, fit_rules, layout_table, logical_dims,  # noqa: E402
                      make_mesh, place_params, put_global)

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# "%x = f32[8,64]{1,0} all-gather(...)"; combined collectives have tuple shapes "(f32[..], ..)".
_COLLECTIVE_RE = re.compile(r"= (\([^()]*\)|\S+) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")

# The default-run matrix: every preset on a 2x2x2 mesh, plus 8-way meshes and context parallelism.
MATRIX = [("data=2,fsdp=2,tensor=2", "dp"), ("data=2,fsdp=2,tensor=2", "fsdp"),
          ("data=2,fsdp=2,tensor=2", "tp"), ("data=2,fsdp=2,tensor=2", "fsdp_tp"),
          ("fsdp=8", "fsdp"), ("tensor=8", "tp"), ("sequence=2,fsdp=2,tensor=2", "fsdp_tp")]
ENGINE_MESH = "data=2,fsdp=2,tensor=2"  # the engine (prefill + paged decode) runs on this one
# with these presets (data parallel, and fsdp + tensor); --all adds fsdp and tp alone.
ENGINE_PRESETS = ("dp", "fsdp_tp")


class WarningLog(logging.Handler):
    """Collects the sharding package's warnings (the fallback messages)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def collectives(compiled) -> list[list[str]]:
    """[[op, result shape], ...] of the cross-device collectives in a compiled program's HLO."""
    return [[op, shape] for shape, op in _COLLECTIVE_RE.findall(compiled.as_text())]


def host_params(model, seed=0):
    """Random parameters as host numpy arrays (identical on every process: same seed, same CPU)."""
    return jax.tree.map(np.asarray, init_params(model, jax.random.key(seed)))


def loss_fn(model, params, tokens_bt):
    """Mean next-token cross-entropy in nats (a train step's loss)."""
    logits = forward(model, params, tokens_bt[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens_bt[:, 1:, None], axis=-1))


def placement_report(placed, host) -> dict:
    """Per parameter: spec, and whether every local shard has exactly the sharded shape and owns
    its memory (is not a view into the full host array, which would keep a full copy alive)."""
    out = {}
    flat_host = {jax.tree_util.keystr(p, simple=True, separator="/"): a
                 for p, a in jax.tree_util.tree_flatten_with_path(host)[0]}
    for path, arr in jax.tree_util.tree_flatten_with_path(placed)[0]:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        h = flat_host[name]
        lo = h.__array_interface__["data"][0]
        hi = lo + h.nbytes
        expected = list(arr.sharding.shard_shape(arr.shape))
        shapes_ok = all(list(s.data.shape) == expected for s in arr.addressable_shards)
        aliased = any(lo <= s.data.unsafe_buffer_pointer() < hi for s in arr.addressable_shards)
        out[name] = {"spec": [list(a) if isinstance(a, tuple) else a for a in arr.sharding.spec],
                     "shape": list(arr.shape), "shard_shape": expected, "shapes_ok": shapes_ok,
                     "aliases_host": aliased, "num_local_shards": len(arr.addressable_shards)}
    return out


def run_matrix(out_prefix: str, cases=MATRIX, engine=True, engine_presets=ENGINE_PRESETS) -> dict:
    """Every (mesh, preset) in `cases` against one device, on the tiny config."""
    from conftest import tiny_checkpoint
    from serving import Engine

    cfg = get_preset("tiny")
    model = Decoder(cfg)
    host = host_params(model)
    loaders = jax.tree.map(lambda a: (lambda a=a: a), host)
    # 8 rows: the batch divides every mesh here, so a dp forward needs no communication at all.
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 17)).astype(np.int32)
    one = jax.devices()[0]
    fwd = jax.jit(lambda p, t: forward(model, p, t))
    ref_logits = np.asarray(fwd(jax.device_put(host, one), tokens[:, :-1]))
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(lambda p, t: loss_fn(model, p, t)))(
        jax.device_put(host, one), tokens)
    ref_grads = jax.tree.map(np.asarray, ref_grads)

    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [40, 41, 42, 43, 44, 45, 46], [7] * 9]
    ckpt = tiny_checkpoint(pathlib.Path(tempfile.mkdtemp()))
    engine_kw = dict(attention="xla", num_pages=64, decode_steps=8)
    ref_tokens = None
    if engine:
        eng = Engine(ckpt, **engine_kw)
        ref_tokens = [o.token_ids for o in eng.generate(prompts, max_new_tokens=10, ignore_eos=True)]

    report = {"devices": len(jax.devices()), "cases": []}
    for mesh_spec, preset in cases:
        warnings = WarningLog()
        logging.getLogger("sharding").addHandler(warnings)
        mesh = make_mesh(mesh_spec)
        rules = fit_rules(preset, mesh, logical_dims(abstract_params(model)))
        params = place_params(loaders, logical_axes(model), mesh, rules)
        with activation_sharding(mesh, rules):
            fwd_c = jax.jit(lambda p, t: forward(model, p, t)).lower(params, tokens[:, :-1]).compile()
            grad_fn = jax.jit(jax.value_and_grad(lambda p, t: loss_fn(model, p, t)),
                              out_shardings=(None, jax.tree.map(lambda a: a.sharding, params)))
            train_c = grad_fn.lower(params, tokens).compile()
        logits = np.asarray(fwd_c(params, tokens[:, :-1]))
        loss, grads = train_c(params, tokens)
        grad_diff = max(float(np.abs(np.asarray(g) - r).max())
                        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
        case = {"mesh": mesh_spec, "rules": preset,
                "logits_max_diff": float(np.abs(logits - ref_logits).max()),
                "loss": float(loss), "ref_loss": float(ref_loss), "grads_max_diff": grad_diff,
                "params": placement_report(params, host),
                "forward_collectives": collectives(fwd_c),
                "train_collectives": collectives(train_c),
                "layout": layout_table(params)}
        if engine and mesh_spec == ENGINE_MESH and preset in engine_presets:
            eng = Engine(ckpt, mesh=mesh, rules=preset, **engine_kw)
            outs = eng.generate(prompts, max_new_tokens=10, ignore_eos=True)
            case["engine_tokens_equal"] = [o.token_ids for o in outs] == ref_tokens
            case["engine_score_max_diff"] = float(np.abs(
                eng.score(prompts[2]) - np.asarray(fwd(jax.device_put(host, one),
                                                       np.asarray([prompts[2]], np.int32)))[0]).max())
            case["kv_cache_spec"] = [list(a) if isinstance(a, tuple) else a
                                     for a in eng.cache.k.sharding.spec]
            case["kv_cache_shard_shape"] = list(eng.cache.k.addressable_shards[0].data.shape)
            case["kv_cache_shape"] = list(eng.cache.k.shape)
        case["warnings"] = warnings.messages
        logging.getLogger("sharding").removeHandler(warnings)
        report["cases"].append(case)
    return report


def run_smollm2(mesh_spec: str, preset: str, new_tokens: int) -> dict:
    """The default model through Engine on a mesh vs one device (model-level forward)."""
    from model.registry import load_checkpoint
    from serving import Engine

    cases = json.loads((HERE.parent / "data" / "smollm2_cases.json").read_text())["cases"]
    ckpt = load_checkpoint("smollm2-135m-instruct")
    # Read each tensor once (dequantizing Q4_1 is the slow part) for both placements.
    host = jax.tree.map(lambda load: load(), ckpt.tree(scan_layers=True))
    ckpt.tensors = {k: (lambda v=v: v) for k, v in _flatten(host).items()}
    ckpt.layer_tensors = {}
    model = Decoder(ckpt.config)
    fwd = jax.jit(lambda p, t: forward(model, p, t))
    single = jax.device_put(host, jax.devices()[0])

    warnings = WarningLog()
    logging.getLogger("sharding").addHandler(warnings)
    mesh = make_mesh(mesh_spec)
    eng = Engine(ckpt, attention="xla", mesh=mesh, rules=preset, scan_layers=True, num_pages=64,
                 max_num_seqs=4)
    report = {"mesh": mesh_spec, "rules": preset, "cases": []}
    for case in cases[:2]:
        ids = case["input_ids"]
        ref = np.asarray(fwd(single, np.asarray([ids], np.int32)))[0]
        got = eng.score(ids)
        report["cases"].append({
            "id": case["id"], "logits_max_diff": float(np.abs(got - ref).max()),
            "max_abs_logit": float(np.abs(ref).max()),
            "top5_equal": np.argsort(-got[-1])[:5].tolist() == np.argsort(-ref[-1])[:5].tolist()})
    outs = eng.generate([c["input_ids"] for c in cases[:2]], max_new_tokens=new_tokens)
    report["greedy_equal_reference"] = [o.token_ids == c["greedy_32"][:new_tokens]
                                        for o, c in zip(outs, cases[:2])]
    report["params"] = {n: {"spec": [list(a) if isinstance(a, tuple) else a for a in a_.sharding.spec],
                            "shard_shape": list(a_.addressable_shards[0].data.shape),
                            "shape": list(a_.shape),
                            "shapes_ok": all(s.data.shape == a_.sharding.shard_shape(a_.shape)
                                             for s in a_.addressable_shards)}
                        for n, a_ in _flatten(eng.params).items()}
    report["fitted_rules"] = [list(r) if not isinstance(r[1], tuple) else [r[0], list(r[1])]
                       for r in eng.rules]
    report["kv_cache_spec"] = [list(a) if isinstance(a, tuple) else a for a in eng.cache.k.sharding.spec]
    report["warnings"] = warnings.messages
    return report


def run_multiprocess(mesh_spec: str, preset: str, out_prefix: str) -> dict:
    """Run under scripts/launch_local.py: the same tiny model, sharded across processes."""
    from conftest import tiny_checkpoint
    from serving import Engine

    cfg = get_preset("tiny")
    model = Decoder(cfg)
    host = host_params(model)
    loaders = jax.tree.map(lambda a: (lambda a=a: a), host)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 17)).astype(np.int32)
    mesh = make_mesh(mesh_spec)
    rules = fit_rules(preset, mesh, logical_dims(abstract_params(model)))
    params = place_params(loaders, logical_axes(model), mesh, rules)
    with activation_sharding(mesh, rules):
        logits = jax.jit(lambda p, t: forward(model, p, t))(params, put_global(tokens[:, :-1], mesh))
        loss = jax.jit(lambda p, t: loss_fn(model, p, t))(params, put_global(tokens, mesh))
    # Engine.score through the paged-cache engine on the same cross-process mesh.
    ckpt = tiny_checkpoint(pathlib.Path(tempfile.mkdtemp()))
    eng = Engine(ckpt, attention="xla", mesh=mesh, rules=preset, num_pages=64)
    prompt = [5, 6, 7, 8, 9, 10, 11]
    report = {
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "devices": len(jax.devices()), "local_devices": len(jax.local_devices()),
        "mesh_processes": sorted({d.process_index for d in mesh.devices.flat}),
        "local_shards": {n: len(a.addressable_shards) for n, a in _flatten(params).items()},
        "specs": {n: str(a.sharding.spec) for n, a in _flatten(params).items()},
        "loss": float(fetch(loss)),
        "logits_fully_addressable": bool(logits.is_fully_addressable),
        "collectives_impl": jax.config.jax_cpu_collectives_implementation,
    }
    arrays = {"logits": fetch(logits), "engine_score": eng.score(prompt),
              "engine_prompt": np.asarray(prompt)}
    if jax.process_index() == 0:
        np.savez(out_prefix + ".npz", **arrays)
    # Every process fetched the same global values: the test compares these across processes.
    report["logits_sum"] = float(arrays["logits"].sum())
    report["engine_score_sum"] = float(arrays["engine_score"].sum())
    return report


def _flatten(tree) -> dict:
    return {jax.tree_util.keystr(p, simple=True, separator="/"): v
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["matrix", "smollm2", "multiprocess"])
    p.add_argument("out", help="output path prefix (OUT.json, OUT.npz)")
    p.add_argument("--mesh", default="data=2,fsdp=2,tensor=2")
    p.add_argument("--rules", default="fsdp_tp")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--all", action="store_true", help="matrix: also every preset on 8-way meshes")
    args = p.parse_args(argv)
    if args.mode == "matrix":
        cases = MATRIX
        if args.all:
            cases = MATRIX + [(m, r) for m in ("data=8", "fsdp=8", "tensor=8", "fsdp=4,tensor=2")
                              for r in ("dp", "fsdp", "tp", "fsdp_tp") if (m, r) not in MATRIX]
        report = run_matrix(args.out, cases,
                            engine_presets=("dp", "fsdp", "tp", "fsdp_tp") if args.all
                            else ENGINE_PRESETS)
    elif args.mode == "smollm2":
        report = run_smollm2(args.mesh, args.rules, args.new_tokens)
    else:
        report = run_multiprocess(args.mesh, args.rules, args.out)
    suffix = "" if jax.process_index() == 0 else f".p{jax.process_index()}"
    pathlib.Path(args.out + suffix + ".json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
