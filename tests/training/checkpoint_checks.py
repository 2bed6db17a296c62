"""Checkpoint checks that need their own process: run by test_checkpoint.py.

    python checkpoint_checks.py kill_during_save RUN_DIR
        trains 2 steps (checkpoint at step 2, committed), runs step 3, starts saving it and
        SIGKILLs itself while the save is in flight.
    python checkpoint_checks.py reshard RUN_DIR OUT.json      (8 CPU devices via XLA_FLAGS)
        trains 2 steps on mesh data=8 and saves; restores the checkpoint onto mesh
        data=2,fsdp=2,tensor=2; reports whether the parameters survived and the losses of one
        more step on both meshes.
"""

import json
import os
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), HERE]
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from conftest import tiny_config  # noqa: E402
from training import Trainer  # noqa: E402


def kill_during_save(run_dir):
    trainer = Trainer(run_dir, tiny_config(steps=6, save_every=2), progress=False,
                      tensorboard=False)
    trainer.run(max_steps=2)
    trainer.checkpointer.wait()
    batch = trainer.put(next(trainer.batches))
    trainer.state, _ = trainer.train_step(trainer.state, batch)
    trainer.save()  # asynchronous: returns while the files are still being written
    os.kill(os.getpid(), signal.SIGKILL)


def _distinct_shards(x) -> int:
    """Into how many different pieces an array is split over the devices (1: replicated)."""
    return len({str(s.index) for s in x.addressable_shards})


def reshard(run_dir, out):
    cfg = tiny_config(steps=4, batch_size=8, save_every=2, eval_every=100, mesh="data=8")
    a = Trainer(run_dir, cfg, progress=False, tensorboard=False)
    a.run(max_steps=2)
    a.checkpointer.wait()
    saved = jax.tree.map(np.asarray, jax.device_get(a.state.params))
    old_shards = _distinct_shards(a.state.params["layers"]["mlp"]["gate"])
    loss_a = a.run(max_steps=1)[0]["loss"]
    a.close()
    # The step-3 checkpoint is not there (save_every=2), so this restores step 2.
    import shutil
    steps = a.checkpointer.all_steps()
    for s in steps:
        if s > 2:
            shutil.rmtree(os.path.join(a.checkpointer.directory, str(s)))
    b = Trainer(run_dir, mesh="data=2,fsdp=2,tensor=2", progress=False, tensorboard=False)
    restored = jax.tree.map(np.asarray, jax.device_get(b.state.params))
    same = all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(saved),
                                                     jax.tree.leaves(restored)))
    new_shards = _distinct_shards(b.state.params["layers"]["mlp"]["gate"])
    step = b.step
    loss_b = b.run(max_steps=1)[0]["loss"]
    b.close()
    with open(out, "w") as f:
        json.dump({"params_equal": same, "restored_step": step, "old_shards": old_shards,
                   "new_shards": new_shards, "new_mesh": dict(b.mesh.shape),
                   "devices": jax.device_count(), "loss_a": loss_a, "loss_b": loss_b}, f)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "kill_during_save":
        kill_during_save(sys.argv[2])
    elif mode == "reshard":
        reshard(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
