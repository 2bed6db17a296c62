"""Checkpoints of a training run with orbax: asynchronous, atomic, keep-last-N, reshardable.

One checkpoint per saved step holds the train state (step, parameters, optimizer state, RNG) as
sharded arrays and the data iterator's position as JSON. orbax writes a step into a temporary
directory and renames it into place only once every file is complete, so a process killed during a
save (even by SIGKILL) leaves the earlier steps intact; the unfinished temporary directory is
ignored and cleaned up when the manager is opened again. Saves are asynchronous: the arrays are
copied to host memory, then written by a background thread while training continues.

Restoring takes the shardings from the target (abstract) state, so a checkpoint written on one
mesh restores onto any other: each device reads only its shard of the new layout.
"""

from __future__ import annotations

import os

import orbax.checkpoint as ocp

from training.step import TrainState


class CheckpointError(ValueError):
    """A checkpoint directory cannot be used: missing, empty, or not matching the model."""


def _as_dict(state: TrainState) -> dict:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
            "rng": state.rng}


class Checkpointer:
    """Periodic saves of (TrainState, data iterator state) under `directory`/<step>/."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise CheckpointError(f"keep (checkpoints to keep) must be >= 1, got {keep}")
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, data_state: dict, force: bool = False) -> bool:
        """Start saving `state` as step `step` (returns once the arrays are copied off the
        devices; the state may then be donated to the next train step)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(_as_dict(state)),
                                  data=ocp.args.JsonSave(data_state))
        return self.manager.save(step, args=args, force=force)

    def restore(self, abstract_state: TrainState, step: int | None = None
                ) -> tuple[TrainState, dict]:
        """(state, data iterator state) of `step` (default: the latest complete one), laid out
        with the shardings of abstract_state's ShapeDtypeStructs."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(_as_dict(abstract_state)),
                                  data=ocp.args.JsonRestore())
        try:
            restored = self.manager.restore(step, args=args)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {self.directory}/{step} does not match this model "
                                  f"and optimizer: {e}") from e
        s = restored["state"]
        state = TrainState(step=s["step"], params=s["params"], opt_state=s["opt_state"],
                           rng=s["rng"])
        return state, dict(restored["data"])

    def wait(self) -> None:
        """Block until pending asynchronous saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

