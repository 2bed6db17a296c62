"""Weights backed by transparent huge pages (serving/hugepages.py): which 2 MiB regions are
advised, contents kept, the off switch, and the engine doing it in the background."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serving import hugepages

MiB = 1 << 20


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return "never"
    return text[text.index("[") + 1:text.index("]")]


def test_regions_cover_every_overlapping_huge_page():
    h = hugepages.HUGE
    assert hugepages.regions([]) == []
    assert hugepages.regions([(5, 5)]) == []  # empty ranges advise nothing
    assert hugepages.regions([(h + 1, h + 2)]) == [h]
    assert hugepages.regions([(h - 1, h + 1)]) == [0, h]  # a range across a boundary: both
    assert hugepages.regions([(0, 3 * h), (2 * h + 5, 2 * h + 9)]) == [0, h, 2 * h]  # merged


@pytest.mark.skipif(not sys.platform.startswith("linux") or _thp_mode() == "never",
                    reason="transparent huge pages are off or not Linux")
def test_collapses_a_large_array_and_keeps_its_contents():
    x = jnp.arange(16 * MiB // 4, dtype=jnp.float32) * 0.5  # 16 MiB: at least 7 whole regions
    want = np.asarray(x).copy()
    done = hugepages.back_with_huge_pages({"w": x, "small": jnp.ones(4)})
    if done == 0:
        pytest.skip("this kernel does not collapse (MADV_COLLAPSE needs Linux 6.1)")
    assert 14 * MiB <= done <= 18 * MiB
    np.testing.assert_array_equal(np.asarray(x), want)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda a: a * 2)(x)), want * 2)


def test_off_switch(monkeypatch):
    monkeypatch.setenv("XLRT_HUGE_PAGES", "0")
    assert not hugepages.enabled()
    assert hugepages.back_with_huge_pages({"w": jnp.zeros(4 * MiB)}) == 0


def test_engine_advises_its_weights_in_the_background(make_tiny_engine, monkeypatch):
    eng = make_tiny_engine()
    assert eng._huge_pages is not None
    eng._huge_pages.join(timeout=60)
    assert not eng._huge_pages.is_alive()
    # The count it recorded is what advising the same weights again finds.
    assert eng.stats["huge_page_bytes"] == hugepages.back_with_huge_pages(eng.params)
    assert eng.generate([[1, 2, 3]], max_new_tokens=2)[0].token_ids
    monkeypatch.setenv("XLRT_HUGE_PAGES", "0")
    assert make_tiny_engine()._huge_pages is None
