"""CUDA paths (selected with ``-m gpu``; they need a GPU and are skipped without one)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_svd_driver_choice_matches_cpu():
    from rcc_compression.compression.lowrank import svd

    w = torch.randn(3, 96, 64, dtype=torch.float64)
    _, s_cpu, _ = svd(w)
    _, s_gpu, _ = svd(w.cuda())
    torch.testing.assert_close(s_gpu.cpu(), s_cpu, rtol=1e-8, atol=1e-8)


def test_cascade_runs_on_cuda_and_matches_cpu(tiny_clip):
    import copy

    from rcc_compression.compression.cascade import CascadePipeline
    from rcc_compression.config import load_config

    section = load_config(None, data={"compression": {
        "dare": {"pruning_rate": 0.5, "iterations": 1, "fine_tune_epochs": 0},
        "nullu": {"param_budget": 0.2, "rank_reduction": None, "energy_threshold": None},
        "alphaedit": {"num_epochs": 0}, "cascade": {"validation_threshold": 0.0}}}).compression
    cpu_model = copy.deepcopy(tiny_clip)
    gpu_model = tiny_clip.to("cuda")
    CascadePipeline(section, device="cpu").compress(cpu_model)
    CascadePipeline(section, device="cuda").compress(gpu_model)
    batch = cpu_model.synthetic_batch(2, torch.Generator().manual_seed(0))
    a = cpu_model(**batch).image_embeds
    b = gpu_model(**{k: v.cuda() for k, v in batch.items()}).image_embeds.cpu()
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_2to4_acceleration_only_where_faster():
    from torch import nn

    from rcc_compression.compression.dare import nm_mask
    from rcc_compression.compression.layers import CompressedLinear
    from rcc_compression.evaluation.efficiency import optimize_execution

    lin = nn.Linear(768, 3072).cuda().half()
    layer = CompressedLinear.from_linear(lin)
    layer.set_sparse(lin.weight.detach(), nm_mask(lin.weight.detach().abs(), 2, 4))
    assert layer.set_execution("semi_structured")
    x = torch.randn(512, 768, device="cuda", dtype=torch.half)
    layer.eval()
    fast = layer(x)
    layer.set_execution("factored")
    torch.testing.assert_close(fast, layer(x), rtol=1e-2, atol=1e-2)

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = layer

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    chosen = optimize_execution(Wrap(), {"x": x})
    assert chosen["lin"] in ("factored", "merged", "semi_structured")


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_layer_kernels_on_cuda_match_the_codes(bits):
    from rcc_compression.compression.layers import CompressedLinear
    from rcc_compression.compression.quant import quantize_nearest

    lin = torch.nn.Linear(256, 512).cuda().to(torch.bfloat16)
    layer = CompressedLinear.from_linear(lin)
    layer.set_quantized("weight", quantize_nearest(layer.weight.detach(), bits, None if bits == 8 else 128))
    layer.eval()
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    reference = layer(x).float()
    for mode in ("int8", "torchao"):
        if mode == "torchao":
            pytest.importorskip("torchao", reason="the gpu extra (torchao) is not installed")
        if layer.set_execution(mode):
            out = layer(x).float()
            assert (out - reference).abs().max() <= 0.05 * reference.abs().max()
        layer.set_execution("factored")
