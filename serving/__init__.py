"""Serving: the Engine (public API), sampling, scheduler, server and artifacts.

Names are imported on first use, so `serving.artifact` (which must run without `model/`) can be
imported without pulling in the Engine and the model code.
"""

_EXPORTS = {"Engine": "serving.engine", "GenerationOutput": "serving.engine",
            "RequestError": "serving.engine", "SamplingError": "serving.sampling",
            "SamplingParams": "serving.sampling"}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'serving' has no attribute {name!r}")


__all__ = list(_EXPORTS)
