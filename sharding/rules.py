"""Logical-axis rules: one table (data) mapping the model's logical names onto mesh axes.

A rule table is a tuple of (logical name, mesh axis | tuple of mesh axes | None). A logical name
may appear more than once: Flax takes the first entry whose mesh axes are not already used by
another dimension of the same array, so ("embed", "fsdp") shards parameters over fsdp while
activations, whose batch dimension already uses fsdp, keep embed unsharded.
"""

from __future__ import annotations

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Activations and the KV cache: batch over data (+fsdp), cache heads over tensor.
_COMMON: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("layers", None),
    ("head_dim", None),
    ("cache_pages", None),
    ("cache_page_slot", None),
    ("expert", "expert"),
)

RULE_PRESETS: dict[str, Rules] = {
    # Pure data parallel: parameters replicated, batch split over data.
    "dp": _COMMON + (("embed", None), ("heads", None), ("kv_heads", None), ("mlp", None),
                     ("vocab", None)),
    # FSDP (ZeRO-3): parameters split over fsdp along embed, gathered for compute.
    "fsdp": _COMMON + (("embed", "fsdp"), ("heads", None), ("kv_heads", None), ("mlp", None),
                       ("vocab", None)),
    # Tensor parallel (Megatron): heads, FFN and vocab split over tensor.
    "tp": _COMMON + (("embed", None), ("heads", "tensor"), ("kv_heads", "tensor"),
                     ("mlp", "tensor"), ("vocab", "tensor")),
    # FSDP + tensor parallel.
    "fsdp_tp": _COMMON + (("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"),
                          ("mlp", "tensor"), ("vocab", "tensor")),
}
DEFAULT_RULES = "fsdp_tp"


def get_rules(rules: str | Rules | None) -> Rules:
    """A preset name, a rule table, or None (the default preset) -> rule table."""
    if rules is None:
        return RULE_PRESETS[DEFAULT_RULES]
    if isinstance(rules, str):
        if rules not in RULE_PRESETS:
            raise ValueError(f"unknown sharding rules {rules!r}; presets: {', '.join(RULE_PRESETS)}")
        return RULE_PRESETS[rules]
    table = tuple((str(name), axes) for name, axes in rules)
    return table
