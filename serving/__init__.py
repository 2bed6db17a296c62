"""Serving: the Engine (public API), sampling, and later the scheduler, server and artifacts."""

from serving.engine import Engine, GenerationOutput, RequestError
from serving.sampling import SamplingError, SamplingParams
