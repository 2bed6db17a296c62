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
