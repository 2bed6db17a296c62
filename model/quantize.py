"""Weight-only int8 quantization with per-output-channel scales (for memory-bound decode).

A weight W is stored as int8 Q with a float32 scale per output channel, W ~= Q * scale, where the
scale is max|W| / 127 over the contracted dimensions. Which dimensions are contracted follows from
the logical axes: the scale keeps the axes the model declares for it (model.layers.weight).
"""

from __future__ import annotations

import numpy as np


def quantize_int8(w: np.ndarray, reduce_axes: tuple[int, ...]):
    """Symmetric per-channel int8: returns (int8 array like w, float32 scale without reduce_axes)."""
    w = np.asarray(w, dtype=np.float32)
    amax = np.max(np.abs(w), axis=reduce_axes, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, np.squeeze(scale, axis=reduce_axes)


def int8_loaders(float_loaders: dict, int8_axes: dict, float_axes: dict | None = None) -> dict:
    """Loaders for an int8 model's params tree from a float model's loaders.

    float_loaders: nested dict of loaders for the float model; int8_axes: logical-axes tree of the
    int8 model (model.decoder.logical_axes), where every quantized weight `x` has a sibling
    `x_scale`. Each weight is read and quantized once; its scale loader reuses the result.
    float_axes: the float model's logical-axes tree, needed when the int8 model stores weights in
    another dim order (Decoder(nk_weights=True)): a weight whose axes differ is transposed to the
    int8 model's order after quantizing (the per-channel scale does not depend on the order).
    """
    out = {}
    for name, axes in int8_axes.items():
        if isinstance(axes, dict):
            out[name] = int8_loaders(float_loaders[name], axes,
                                     None if float_axes is None else float_axes[name])
        elif name.endswith("_scale"):
            continue
        elif name + "_scale" in int8_axes:
            scale_axes = int8_axes[name + "_scale"]
            src_axes = tuple(axes if float_axes is None else float_axes[name])
            order = _order(src_axes, tuple(axes), name)
            reduce_axes = tuple(i for i, a in enumerate(src_axes) if a not in scale_axes)
            memo = {}

            def quantized(load=float_loaders[name], reduce_axes=reduce_axes, order=order,
                          memo=memo):
                if "q" not in memo:
                    q, memo["scale"] = quantize_int8(load(), reduce_axes)
                    memo["q"] = q if order is None else np.ascontiguousarray(q.transpose(order))
                return memo

            out[name] = lambda quantized=quantized: quantized()["q"]
            out[name + "_scale"] = lambda quantized=quantized, memo=memo: quantized().pop("scale")
        else:
            out[name] = float_loaders[name]
    return out


def nk_loaders(float_loaders: dict, axes: dict, float_axes: dict) -> dict:
    """Loaders for a float model that stores its matmul weights output dims first
    (Decoder(nk_weights=True)), from the [K, N] model's loaders: each weight whose logical axes
    (`axes`) are a reordering of `float_axes` is transposed once when loaded."""
    out = {}
    for name, ax in axes.items():
        if isinstance(ax, dict):
            out[name] = nk_loaders(float_loaders[name], ax, float_axes[name])
            continue
        order = _order(tuple(float_axes[name]), tuple(ax), name)
        out[name] = (float_loaders[name] if order is None else
                     lambda load=float_loaders[name], order=order:
                     np.ascontiguousarray(np.asarray(load()).transpose(order)))
    return out


def _order(src_axes: tuple, dst_axes: tuple, name: str):
    """The transpose taking a weight from src_axes to dst_axes (None: the same order)."""
    if src_axes == dst_axes:
        return None
    if (len(src_axes) != len(dst_axes) or set(src_axes) != set(dst_axes)
            or len(set(src_axes)) != len(src_axes)):
        raise ValueError(f"weight {name!r}: axes {dst_axes} are not a reordering of the "
                         f"[K, N] weight's {src_axes}")
    return tuple(src_axes.index(a) for a in dst_axes)
