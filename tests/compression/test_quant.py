"""Stage quant: error bounds, GPTQ against nearest rounding, packing, stored bytes, save/load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rcc_compression.compression.cascade import CascadePipeline
from rcc_compression.compression.layers import CompressedLinear, compressed_layers
from rcc_compression.compression.quant import (
    LayerQuant,
    QuantConfig,
    QuantStage,
    damped_inverse,
    gptq,
    gptq_formats,
    pack_codes,
    quantize_nearest,
    relative_output_error,
    sqnr_db,
    unpack_codes,
)
from rcc_compression.compression.storage import LAYERS_FILE, load_compressed, save_compressed, stored_bytes

from .conftest import MLP, batches_for


def _anisotropic_inputs(n: int, rows: int = 2048, seed: int = 0) -> torch.Tensor:
    """Inputs whose energy falls off over 3 decades along random directions (as real activations do)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g) * torch.logspace(0, -1.5, n)
    return x @ torch.linalg.qr(torch.randn(n, n, generator=g)).Q


def test_gaussian_error_bounds():
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(1))
    assert sqnr_db(w, quantize_nearest(w, 8).dequantize()) >= 40.0
    assert sqnr_db(w, quantize_nearest(w, 4, 32).dequantize()) >= 20.0
    # each bit halves the step: about 6 dB per bit, and zero points never hurt
    s4, s3 = (sqnr_db(w, quantize_nearest(w, b, 64).dequantize()) for b in (4, 3))
    assert 4.5 <= s4 - s3 <= 7.5
    assert sqnr_db(w, quantize_nearest(w, 3, 64, symmetric=False).dequantize()) >= s3


@pytest.mark.parametrize(("bits", "group", "act_order"), [(4, None, False), (3, 64, False), (3, 64, True),
                                                         (2, 32, False)])
def test_gptq_output_error_at_most_nearest(bits, group, act_order):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 128, generator=g)
    x = _anisotropic_inputs(128)
    H = x.t() @ x
    near = relative_output_error(w, quantize_nearest(w, bits, group).dequantize(), H)
    q = gptq(w, H, bits, group, act_order=act_order)
    ours = relative_output_error(w, q.dequantize(), H)
    assert ours <= near
    assert ours <= 0.6 * near  # and by a margin on inputs this anisotropic
    assert q.codes.max() < 2**bits


def test_gptq_keeps_the_mask():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 96, generator=g)
    mask = torch.rand(32, 96, generator=g) > 0.5
    x = _anisotropic_inputs(96)
    H = x.t() @ x
    q = gptq(w * mask, H, 4, 32, mask=mask)
    values = q.dequantize(mask=mask)
    assert torch.all(values[~mask] == 0)
    assert torch.all(q.codes[~mask] == 0)
    assert relative_output_error(w * mask, values, H) <= relative_output_error(
        w * mask, quantize_nearest(w * mask, 4, 32, mask=mask).dequantize(mask=mask), H)


def test_gptq_formats_in_one_pass_equal_one_format_at_a_time():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(24, 96, generator=g)
    mask = torch.rand(24, 96, generator=g) > 0.3
    x = _anisotropic_inputs(96)
    H = x.t() @ x
    fmts = [(4, 32, True), (3, 64, False), (8, None, True), (2, None, False)]
    for act_order in (False, True):
        together = gptq_formats(w * mask, H, fmts, mask, act_order=act_order)
        for (bits, group, sym), q in zip(fmts, together, strict=True):
            alone = gptq(w * mask, H, bits, group, sym, mask, act_order=act_order)
            assert torch.equal(q.codes, alone.codes)
            assert torch.equal(q.dequantize(mask=mask), alone.dequantize(mask=mask))


def test_gptq_row_losses_are_each_rows_error_under_the_damped_moment():
    """GPTQ's column losses sum, per row, to ``e H_d e^T`` (the planner scores candidates by them)."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(24, 96, generator=g)
    x = _anisotropic_inputs(96)
    x[:, 7] = 0  # an input the data never reaches
    H = x.t() @ x
    U, shift = damped_inverse(H, 0.01)
    assert float(shift[7]) > 1.0 and torch.allclose(shift[0], shift[1])
    fmts = [(8, None, True), (4, 32, False), (3, None, False), (2, 64, False)]
    for act_order in (False, True):
        losses: list[torch.Tensor] = []
        parts = gptq_formats(w, H, fmts, None, 0.01, act_order=act_order, inverse=U, row_losses=losses)
        for q, loss in zip(parts, losses, strict=True):
            e = (w - q.dequantize()).double()
            exact = ((e @ H.double()) * e).sum(1)
            assert torch.allclose(loss - (e * e * shift).sum(1), exact, rtol=1e-4, atol=1e-9 * float(exact.max()))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("numel", [1, 7, 8, 13, 1000])
def test_pack_unpack_roundtrip(bits, numel):
    codes = torch.randint(0, 2**bits, (numel,), dtype=torch.uint8, generator=torch.Generator().manual_seed(numel))
    packed = pack_codes(codes, bits)
    assert packed.numel() == (numel * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, numel), codes)


def _quantized_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    """Three layers covering the stored forms: dense S, sparse S, sparse S plus factors (with scales)."""
    g = torch.Generator().manual_seed(4)
    model = nn.Sequential(*(nn.Linear(256, 256) for _ in range(3))).to(dtype)
    stage = QuantStage(QuantConfig(bits=4, group_size=32, rounding="nearest", targets=["."], ignore=[]))
    for i, fmt in enumerate([(4, 32, True), (3, 64, False), (2, None, True)]):
        layer = CompressedLinear.from_linear(model[i])
        if i > 0:
            layer.set_sparse(layer.weight.detach(), torch.rand(256, 256, generator=g) > 0.7)
        if i == 2:
            layer.set_low_rank(torch.randn(256, 8, generator=g) * 0.1, torch.randn(8, 256, generator=g) * 0.1)
            layer.set_scales(torch.rand(256, generator=g) + 0.5, None)
        bits, group, sym = fmt
        layer.set_quantized("weight", quantize_nearest(layer.weight.detach(), bits, group, sym, layer.mask))
        if layer.rank:
            stage._quantize_layer(layer, LayerQuant(bits=None, factor_bits=8), None)
        model[i] = layer
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_exact_and_stored_bytes_match_the_file(tmp_path, dtype):
    model = _quantized_model(dtype)
    x = torch.randn(5, 256, dtype=dtype)
    expected = model(x)
    manifest = save_compressed(model, tmp_path / "ckpt")
    reported = sum(stored_bytes(m) for m in compressed_layers(model).values())
    assert manifest["stored_bytes"]["layers"] == reported
    on_disk = (tmp_path / "ckpt" / LAYERS_FILE).stat().st_size
    assert abs(on_disk - reported) <= 0.02 * on_disk
    dense = sum(256 * 257 * x.element_size() for _ in range(3))
    assert reported < dense / (6 if dtype == torch.float32 else 2.5)  # 2-4 bits and masks, of 16 or 32
    loaded = load_compressed(tmp_path / "ckpt", model=nn.Sequential(*(nn.Linear(256, 256) for _ in range(3))).to(dtype))
    assert torch.equal(loaded(x), expected)
    for (name, a), b in zip(compressed_layers(model).items(), compressed_layers(loaded).values(), strict=True):
        assert set(a.quant) == set(b.quant), name
        for part, q in a.quant.items():
            assert b.quant[part].is_packed  # loaded in the inference form: the stored codes, packed
            assert torch.equal(q.codes, b.quant[part].grid_codes()) and torch.equal(q.scale, b.quant[part].scale)
            assert torch.equal(getattr(a, part), getattr(b, part))
        assert (a.mask is None) == (b.mask is None) and (a.mask is None or torch.equal(a.mask, b.mask))
        assert a.rank == b.rank


def test_moved_values_go_back_on_the_grid():
    model = _quantized_model()
    layer = model[1]
    before = layer.quant["weight"].codes.clone()
    with torch.no_grad():
        layer.weight.add_(1e-4 * torch.randn_like(layer.weight) * layer.mask)
    assert layer.sync_quant() == ["weight"]
    q = layer.quant["weight"]
    assert torch.equal(layer.weight.detach(), q.dequantize(mask=layer.mask))
    assert (q.codes != before).float().mean() < 0.05  # a nudge moves few codes
    assert layer.sync_quant() == []


def test_cascade_with_quant_keeps_mask_and_rank_and_gptq_beats_nearest():
    scale = torch.logspace(0, -1.5, 24)
    batches = batches_for(24, 6, scale=scale)
    results = {}
    for rounding in ("nearest", "gptq"):
        torch.manual_seed(0)
        model = MLP()
        section = {"dare": {"pruning_rate": 0.5, "iterations": 1, "fine_tune_epochs": 0, "targets": ["fc"],
                            "ignore": []},
                   "nullu": {"param_budget": 0.3, "rank_reduction": None, "energy_threshold": None,
                             "targets": ["fc"], "ignore": [], "decomposition_method": "activation_aware"},
                   "quant": {"bits": 3, "group_size": None, "rounding": rounding, "targets": ["fc"], "ignore": []},
                   "cascade": {"stages": ["dare", "nullu", "quant"], "validation_threshold": 0.0}}
        pipe = CascadePipeline(section, calibration_data=batches)
        pipe.compress(model)
        before = {n: (m.mask.clone(), m.rank) for n, m in compressed_layers(model).items()}
        stats = pipe.stage_results["quant"]
        for name, layer in compressed_layers(model).items():
            assert set(layer.quant) == {"weight", "lr_A", "lr_B"}
            assert torch.equal(layer.mask, before[name][0]) and layer.rank == before[name][1] > 0
            assert torch.all(layer.weight.detach()[~layer.mask] == 0)
        results[rounding] = stats["mean_output_error"]
    assert results["gptq"] <= results["nearest"]


def test_int8_kernel_matches_the_float_path():
    lin = nn.Linear(64, 32)
    layer = CompressedLinear.from_linear(lin)
    layer.set_quantized("weight", quantize_nearest(layer.weight.detach(), 8))
    layer.eval()
    x = torch.randn(3, 7, 64)
    reference = layer(x)
    assert layer.set_execution("int8_weight")
    torch.testing.assert_close(layer(x), reference, rtol=1e-4, atol=1e-4)
    g4 = CompressedLinear.from_linear(lin)
    g4.set_quantized("weight", quantize_nearest(g4.weight.detach(), 4, 32))
    assert not g4.set_execution("int8_weight")  # only 8-bit per-channel parts have the kernel


def test_onnx_export_of_quantized_layers_matches_pytorch(tmp_path):
    pytest.importorskip("onnxruntime", reason="the export extra (onnx, onnxruntime) is not installed")
    from rcc_compression.compression.onnx_export import export_onnx
    from rcc_compression.models import get_model

    from ..deploy.conftest import compress_quick

    torch.manual_seed(0)
    wrapper = compress_quick(get_model("tiny-clip"), rank=4, densities=(0.2, 0.03, None))
    for layer in compressed_layers(wrapper.model).values():
        layer.set_quantized("weight", quantize_nearest(layer.weight.detach(), 4, 32, False, layer.mask))
        layer.set_quantized("lr_A", quantize_nearest(layer.lr_A.detach(), 8))
    report = export_onnx(wrapper, tmp_path / "onnx")
    assert all(g["max_abs_diff"] < 1e-4 for g in report["graphs"].values())


def test_a_rounding_on_the_same_inputs_is_memoised_and_a_changed_weight_is_not(monkeypatch):
    """The end-to-end choice reruns quant from the dense start: a layer rounded the same way on the same weights and
    second moment is rounded once (the codes equal), and any change of the weight rounds it again."""
    import copy

    from rcc_compression.compression import quant as quant_mod
    from rcc_compression.compression.stage import CompressionContext

    calls = []
    real = quant_mod.quantize_weight
    monkeypatch.setattr(quant_mod, "quantize_weight", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    dense = MLP()
    memo: dict = {}
    codes = []
    for perturb in (False, False, True):
        model = copy.deepcopy(dense)
        if perturb:
            with torch.no_grad():
                model.fc1.weight.add_(0.05 * torch.randn(model.fc1.weight.shape))
        for n in ("fc1", "fc2"):
            setattr(model, n, CompressedLinear.adopt(getattr(model, n)))
        ctx = CompressionContext(model=model, dense={n: getattr(dense, n).weight.detach() for n in ("fc1", "fc2")},
                                 dense_model=dense, batches=batches_for(24, 4), memo=memo)
        QuantStage({"bits": 4, "targets": ["fc"], "ignore": []}).compress(model, ctx)
        codes.append({n: m.quant["weight"].codes.clone() for n, m in compressed_layers(model).items()})
    assert len(calls) == 3  # fc1 and fc2 once, then fc1 again for its changed weight
    assert all(torch.equal(codes[0][n], codes[1][n]) for n in ("fc1", "fc2"))
    assert torch.equal(codes[2]["fc2"], codes[0]["fc2"]) and not torch.equal(codes[2]["fc1"], codes[0]["fc1"])


def test_sequential_inputs_round_each_layer_on_what_the_rounded_prefix_feeds_it():
    """``quant.inputs: sequential`` (the GPTQ reference's order), one layer per group: fc2 is rounded against the
    second moment of the inputs the rounded fc1 produces, exactly; ``dense`` against the dense model's."""
    import copy

    from rcc_compression.compression.calibration import collect_layer_stats
    from rcc_compression.compression.stage import CompressionContext

    torch.manual_seed(0)
    dense = MLP()
    batches = batches_for(24, 4)
    codes = {}
    for inputs in ("dense", "sequential"):
        model = copy.deepcopy(dense)
        for n in ("fc1", "fc2"):
            setattr(model, n, CompressedLinear.adopt(getattr(model, n)))
        ctx = CompressionContext(model=model, dense={n: getattr(dense, n).weight.detach() for n in ("fc1", "fc2")},
                                 dense_model=dense, batches=batches)
        QuantStage({"bits": 3, "targets": ["fc"], "ignore": [], "inputs": inputs, "sequential_group": 1}
                   ).compress(model, ctx)
        codes[inputs] = model
    # fc1 is the first layer: both see the dense inputs
    assert torch.equal(codes["dense"].fc1.quant["weight"].codes, codes["sequential"].fc1.quant["weight"].codes)
    for inputs, source in (("dense", dense), ("sequential", codes["sequential"])):
        H = collect_layer_stats(source, ["fc2"], batches, gram=True)["fc2"].gram
        expected = gptq(dense.fc2.weight.detach(), H, 3, None, True)
        assert torch.equal(codes[inputs].fc2.quant["weight"].codes, expected.codes), inputs
    assert not torch.equal(codes["dense"].fc2.quant["weight"].codes, codes["sequential"].fc2.quant["weight"].codes)
