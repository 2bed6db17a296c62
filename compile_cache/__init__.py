"""Compilation: the persistent compilation cache, compile counters, compile plans and AOT."""

from compile_cache.cache import configure_cache
from compile_cache.monitor import CompileCounts, counts as compile_counts
from compile_cache.plan import CompilePlan, PlanError, PlannedProgram, ProgramSpec, ServingBuckets
