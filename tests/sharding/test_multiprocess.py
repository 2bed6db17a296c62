"""Two processes on localhost, joined by jax.distributed (gloo collectives), compute what one does.

scripts/launch_local.py starts mesh_checks.py twice with 4 CPU devices each; the 8-device mesh
spans both processes (the data axis crosses the process boundary, fsdp and tensor stay inside
each). The pytest process (one device) computes the references.
"""

import pathlib
import numpy as np
import pytest

from subprocess_runner import run_multiprocess


def _reference(tmp_path):
    import jax

    import importlib.util  # tests/conftest.py by path: other conftest modules share its name
    spec = importlib.util.spec_from_file_location(
        "tests_conftest", pathlib.Path(__file__).parents[1] / "conftest.py")
    top = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(top)
    tiny_checkpoint = top.tiny_checkpoint
    from mesh_checks import host_params, loss_fn
    from model.config import get_preset
    from model.decoder import Decoder, forward
    from serving import Engine

    cfg = get_preset("tiny")
    model = Decoder(cfg)
    host = host_params(model)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 17)).astype(np.int32)
    logits = np.asarray(jax.jit(lambda p, t: forward(model, p, t))(host, tokens[:, :-1]))
    loss = float(jax.jit(lambda p, t: loss_fn(model, p, t))(host, tokens))
    eng = Engine(tiny_checkpoint(tmp_path), attention="xla", num_pages=64)
    return logits, loss, eng


@pytest.mark.parametrize("mesh,preset", [("data=2,fsdp=2,tensor=2", "fsdp_tp")])
def test_two_processes_match_one(tmp_path, mesh, preset):
    out = str(tmp_path / "mp")
    reports = run_multiprocess(out, 2, 4, "--mesh", mesh, "--rules", preset)
    ref_logits, ref_loss, eng = _reference(tmp_path)

    for i, r in enumerate(reports):
        assert (r["process_index"], r["process_count"]) == (i, 2)
        assert (r["devices"], r["local_devices"]) == (8, 4)
        assert r["mesh_processes"] == [0, 1]
        assert r["collectives_impl"] == "gloo"
        assert all(n == 4 for n in r["local_shards"].values())  # each process: its 4 shards only
        assert not r["logits_fully_addressable"]  # the logits really live on both processes
        assert abs(r["loss"] - ref_loss) <= 1e-5
    assert reports[0]["logits_sum"] == reports[1]["logits_sum"]
    assert reports[0]["engine_score_sum"] == reports[1]["engine_score_sum"]
    assert reports[0]["specs"]["layers/attn/q"] == "P(None, 'fsdp', 'tensor', None)"

    arrays = np.load(out + ".npz")
    assert np.abs(arrays["logits"] - ref_logits).max() <= 1e-4
    score = eng.score(arrays["engine_prompt"].tolist())
    assert np.abs(arrays["engine_score"] - score).max() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("mesh,preset,procs,per_proc", [
    ("data=2,fsdp=2,tensor=2", "dp", 2, 4), ("fsdp=8", "fsdp", 2, 4),
    ("tensor=8", "tp", 2, 4),  # tensor crossing processes: slow on a cluster, still correct
    ("data=2,tensor=2", "fsdp_tp", 4, 1)])
def test_multiprocess_presets_slow(tmp_path, mesh, preset, procs, per_proc):
    out = str(tmp_path / "mp")
    reports = run_multiprocess(out, procs, per_proc, "--mesh", mesh, "--rules", preset)
    ref_logits, ref_loss, eng = _reference(tmp_path)
    assert len({r["logits_sum"] for r in reports}) == 1
    for r in reports:
        assert abs(r["loss"] - ref_loss) <= 1e-5
    arrays = np.load(out + ".npz")
    assert np.abs(arrays["logits"] - ref_logits).max() <= 1e-4
    assert np.abs(arrays["engine_score"] - eng.score(arrays["engine_prompt"].tolist())).max() <= 1e-4
