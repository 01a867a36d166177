"""A compressed copy of the bundled CLIP, built fast (magnitude S + SVD low rank), for serving and export tests."""

from __future__ import annotations

import base64
import io

import numpy as np
import torch


def compress_quick(wrapper, rank: int = 8, densities: tuple[float | None, ...] = (0.1,), scales: bool = False):
    """Replace the wrapper's target Linear layers by S (top-|w| of the rank-r residual) + B A, in place.

    Layer i gets density ``densities[i % len(densities)]`` (``None``: S kept dense); with ``scales``
    every other layer also gets per-channel input and output scales.
    """
    import re

    from rcc_compression.compression.layers import CompressedLinear, replace_module

    pats = [re.compile(p) for p in wrapper.default_targets]
    names = [n for n, m in wrapper.model.named_modules()
             if isinstance(m, torch.nn.Linear) and any(p.search(n) for p in pats)]
    g = torch.Generator().manual_seed(0)
    for i, name in enumerate(names):
        lin = wrapper.model.get_submodule(name)
        layer = CompressedLinear.from_linear(lin)
        w = lin.weight.detach()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        b, a = u[:, :rank] * s[:rank], vh[:rank]
        resid = w - b @ a
        density = densities[i % len(densities)]
        if density is None:
            layer.set_sparse(resid, None)
        else:
            k = max(1, int(density * resid.numel()))
            thresh = resid.abs().flatten().kthvalue(resid.numel() - k + 1).values
            layer.set_sparse(resid, resid.abs() >= thresh)
        layer.set_low_rank(b, a)
        if scales and i % 2:
            layer.set_scales(1 + 0.1 * torch.rand(lin.in_features, generator=g),
                             1 + 0.1 * torch.rand(lin.out_features, generator=g))
        replace_module(wrapper.model, name, layer)
    return wrapper.eval()


def png_b64(seed: int, size: int = 64, solid: bool = False) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = np.full((size, size, 3), 120, np.uint8) if solid else (rng.random((size, size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decoded(b64: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")
