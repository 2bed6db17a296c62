import jax
import jax.numpy as jnp
import numpy as np

from compile_cache import compile_counts


def test_counts_new_programs_only():
    x = jnp.asarray(np.arange(5, dtype=np.float32))
    f = jax.jit(lambda v: v * 3 + 1)
    before = compile_counts().backend_compiles
    f(x).block_until_ready()
    after_first = compile_counts().backend_compiles
    f(x).block_until_ready()
    assert after_first - before == 1
    assert compile_counts().backend_compiles == after_first  # same shapes: no new compile
    f(jnp.zeros((7,), jnp.float32)).block_until_ready()  # a new shape compiles a new program
    assert compile_counts().backend_compiles >= after_first + 1


def test_parallel_compile_plan_keeps_order_and_counts_per_thread(tmp_path):
    from compile_cache.aot import compile_plan
    from compile_cache.monitor import thread_counts
    from compile_cache.plan import CompilePlan, ProgramSpec

    def program(k):
        return jax.jit(lambda v: jnp.tanh(v * k) @ v.T)

    specs = [ProgramSpec(f"p{k}", program(k), (jax.ShapeDtypeStruct((4 + k, 8), jnp.float32),))
             for k in range(5)]
    plan = CompilePlan(specs, {"test": "parallel"})
    before, mine = compile_counts().backend_compiles, thread_counts().backend_compiles
    result = compile_plan(plan, workers=3, store_dir=str(tmp_path))
    assert [r["key"] for r in result.records] == [f"p{k}" for k in range(5)]
    assert [r["source"] for r in result.records] == ["compiled"] * 5
    assert compile_counts().backend_compiles - before == 5
    assert thread_counts().backend_compiles == mine  # the pool's threads compiled, not this one
    for k in range(5):  # each executable is its own program
        x = np.ones((4 + k, 8), np.float32)
        np.testing.assert_allclose(result.executables[f"p{k}"](x), np.tanh(x * k) @ x.T,
                                   rtol=1e-5)
    again = compile_plan(plan, workers=2, store_dir=str(tmp_path))  # from the executable store
    assert [r["source"] for r in again.records] == ["aot-store"] * 5
