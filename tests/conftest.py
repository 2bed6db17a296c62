"""Shared fixtures. Tests run on CPU; multi-device tests spawn subprocesses with 8 host devices."""

import json
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

DATA = pathlib.Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def golden_cases():
    return json.loads((DATA / "smollm2_cases.json").read_text())["cases"]


@pytest.fixture(scope="session")
def golden_logits():
    import numpy as np
    return dict(np.load(DATA / "smollm2_logits.npz"))


@pytest.fixture(scope="session")
def smollm2_engine():
    """The default model in float32 with the XLA attention backend, loaded once per session."""
    from serving import Engine
    return Engine.from_pretrained("smollm2-135m-instruct", dtype="float32", attention="xla")
