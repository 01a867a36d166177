"""The per-layer planner over bits, rank and sparsity: byte model, error estimates, the knapsack."""

from __future__ import annotations

import itertools

import torch

from rcc_compression.compression.layers import CompressedLinear
from rcc_compression.compression.planner import Choice, LayerShape, allocate, choice_bytes, layer_choices
from rcc_compression.compression.quant import LayerQuant, QuantConfig, QuantStage
from rcc_compression.compression.storage import stored_bytes


def _problem(seed: int = 0, m: int = 48, n: int = 64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g)
    x = torch.randn(512, n, generator=g) * torch.logspace(0, -1, n)
    return w, x.t() @ x, LayerShape(m, n, 4, True)


def test_allocate_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    options = []
    for _ in range(4):
        sizes = sorted(torch.randint(10, 200, (4,), generator=g).tolist())
        errs = sorted(torch.rand(4, generator=g).tolist(), reverse=True)
        options.append([Choice(nbytes=b, error=e) for b, e in zip(sizes, errs, strict=True)])
    floor = sum(o[0].nbytes for o in options)
    for budget in (floor, floor + 60, floor + 200, floor + 400):
        sel = allocate(options, budget)
        got = sum(options[i][k].error for i, k in enumerate(sel))
        assert sum(options[i][k].nbytes for i, k in enumerate(sel)) <= budget
        best = min(sum(o[k].error for o, k in zip(options, ks, strict=True))
                   for ks in itertools.product(range(4), repeat=4)
                   if sum(o[k].nbytes for o, k in zip(options, ks, strict=True)) <= budget)
        assert got <= best + 0.25 * max(best, 1e-9) + 0.05  # Lagrangian plus greedy fill: near the optimum


def test_choice_bytes_are_what_the_layer_stores():
    w, H, shape = _problem()
    for c in layer_choices(w, H, shape, sparse=True, lowrank=True):
        if not c.keep_s or c.pruning_rate or c.rank or c.bits is None:
            continue  # the quant stage alone builds dense quantized S (pruning and factors have their own tests)
        layer = CompressedLinear.from_linear(torch.nn.Linear(64, 48))
        layer.set_sparse(w)
        stage = QuantStage(QuantConfig(rounding="gptq"))
        stage._quantize_layer(layer, LayerQuant(bits=c.bits, group_size=c.group_size, symmetric=c.symmetric), H)
        assert stored_bytes(layer) == c.nbytes, c.label()


def test_estimates_order_by_bits_and_gptq_estimate_is_what_the_stage_gets():
    w, H, shape = _problem(2)
    choices = {c.label(): c for c in layer_choices(w, H, shape, sparse=False, lowrank=True)}
    assert choices["float"].error == 0.0
    assert choices["int8"].error < choices["int4"].error < choices["int3"].error
    assert choices["int3/g32"].error < choices["int3"].error  # smaller groups cost bytes and remove error
    # a low-rank correction of the rounding error of S lowers the error
    assert choices["int2/g32 + r4 int8"].error < choices["int2/g32"].error
    layer = CompressedLinear.from_linear(torch.nn.Linear(64, 48))
    layer.set_sparse(w)
    QuantStage(QuantConfig())._quantize_layer(layer, LayerQuant(bits=4, group_size=32, symmetric=False), H)
    d = (w - layer.weight.detach()).double()
    err = float(((d @ H.double()) * d).sum() / ((w.double() @ H.double()) * w.double()).sum())
    assert abs(err - choices["int4/g32"].error) <= 1e-6 + 1e-4 * err
    assert choice_bytes(shape, Choice()) == shape.dense_bytes


def test_every_rounded_format_is_scored_by_its_exact_output_error():
    """Plain GPTQ candidates are scored from GPTQ's own losses: equal to ``tr(D H D^T)`` weighted by rows."""
    w, H, shape = _problem(2)
    rw = torch.rand(w.shape[0], generator=torch.Generator().manual_seed(3))
    scored = [c for c in layer_choices(w, H, shape, sparse=False, lowrank=False, row_weight=rw) if c.bits]
    assert len(scored) == 7  # the formats whose groups are narrower than the 64 columns
    for c in scored:
        layer = CompressedLinear.from_linear(torch.nn.Linear(64, 48))
        layer.set_sparse(w)
        fmt = LayerQuant(bits=c.bits, group_size=c.group_size, symmetric=c.symmetric)
        QuantStage(QuantConfig())._quantize_layer(layer, fmt, H)
        d = (w - layer.weight.detach()).double()
        exact = float((((d @ H.double()) * d).sum(1) * rw.double()).sum())
        assert abs(exact - c.error) <= 1e-5 * exact + 1e-12, c.label()


def test_whitened_top_directions_are_the_leading_singular_triplets():
    from rcc_compression.compression.lowrank import whitened_top

    g = torch.Generator().manual_seed(2)
    R = torch.randn(80, 12, generator=g) @ torch.randn(12, 120, generator=g) + 1e-3 * torch.randn(80, 120, generator=g)
    L = torch.linalg.cholesky(torch.eye(120) + 0.1 * torch.ones(120, 120))
    U, S, Vh = whitened_top(R, L, 20)
    ref = torch.linalg.svdvals(R @ L)
    assert torch.allclose(S[:12], ref[:12], rtol=1e-4)
    assert torch.allclose((U[:, :12] * S[:12]) @ Vh[:12], R @ L, atol=1e-2 * float(ref[11]))
    U2, S2, _ = whitened_top(R, L, 20)
    assert torch.equal(S, S2) and torch.equal(U, U2)  # seeded


def _mlp_and_batches():
    from .conftest import MLP, batches_for

    torch.manual_seed(0)
    return MLP(n=64, hidden=128, out=16), batches_for(64, 6, scale=torch.logspace(0, -1, 64))


def test_compress_model_quant_lands_on_the_planned_rate():
    from rcc_compression import compress_model
    from rcc_compression.compression.layers import compressed_layers

    model, batches = _mlp_and_batches()
    out = compress_model(model, 0.85, "quant", calibration_data=batches,
                         config={"compression": {"cascade": {"validation_threshold": 0.0}}})
    stats = out.compression_stats
    assert stats["plan"]["stages"] == ["quant"]
    assert abs(stats["achieved_rate"] - stats["plan"]["predicted_rate"]) < 1e-9  # the byte model is exact
    assert stats["achieved_rate"] >= 0.85
    layers = compressed_layers(out)
    assert set(layers) == {"fc1", "fc2"} and all(m.quant for m in layers.values())
    for name, m in layers.items():
        assert m.quant["weight"].bits == stats["plan"]["layers"][name]["bits"]


def test_compress_model_cascade_plans_bits_rank_and_sparsity():
    from rcc_compression import compress_model

    model, batches = _mlp_and_batches()
    x = torch.cat([b["x"] for b in batches])
    dense_out = model(x).detach()
    cfg = {"compression": {"cascade": {"stages": ["dare", "nullu"], "validation_threshold": 0.0}}}
    out = compress_model(model, 0.93, "cascade", calibration_data=batches, config=cfg)
    plan = out.compression_stats["plan"]
    assert plan["dimensions"] == ["bits", "sparsity", "rank"]
    assert abs(out.compression_stats["achieved_rate"] - plan["predicted_rate"]) < 1e-9
    assert out.compression_stats["achieved_rate"] >= 0.93
    err = float((out(x).detach() - dense_out).pow(2).sum() / dense_out.pow(2).sum())
    assert err < 0.05  # 14x smaller, a few per cent of output energy lost


def test_low_rank_fits_what_the_rounded_s_leaves():
    """quant -> nullu -> quant: S kept as codes, factors fitted to its residual, then rounded; rank kept."""
    from rcc_compression.compression.cascade import CascadePipeline
    from rcc_compression.compression.layers import compressed_layers

    errors = {}
    for ranks in (None, {"fc1": 8, "fc2": 8}):
        model, batches = _mlp_and_batches()
        x = torch.cat([b["x"] for b in batches])
        dense_out = model(x).detach()
        plan = {n: {"bits": 2, "factor_bits": 8, "group_size": 32, "symmetric": False} for n in ("fc1", "fc2")}
        stages = ["quant"] if ranks is None else ["quant", "nullu", "quant"]
        section = {"quant": {"layers": plan}, "nullu": {"layer_ranks": ranks or {}, "decomposition_method":
                                                        "activation_aware"},
                   "cascade": {"stages": stages, "validation_threshold": 0.0}}
        CascadePipeline(section, calibration_data=batches).compress(model)
        for layer in compressed_layers(model).values():
            assert layer.quant["weight"].bits == 2 and layer.mask is None
            if ranks:
                assert layer.rank == 8 and set(layer.quant) == {"weight", "lr_A", "lr_B"}
        errors[ranks is None] = float((model(x).detach() - dense_out).pow(2).sum() / dense_out.pow(2).sum())
    assert errors[False] < 0.7 * errors[True]


def test_compress_model_reports_progress_of_planning_and_stages(capsys):
    from rcc_compression import compress_model

    model, batches = _mlp_and_batches()
    seen: list[str] = []
    compress_model(model, 0.8, "quant", calibration_data=batches, progress=False,
                   progress_callback=lambda what, done, total: seen.append(what.split(" ")[0]),
                   config={"compression": {"cascade": {"validation_threshold": 0.0}}})
    assert "plan" in seen and "quant" in seen
    assert capsys.readouterr().err == ""  # progress=False draws nothing
def test_split_error_in_chunks_equals_all_at_once(monkeypatch):
    """split_error decomposes layers in bounded chunks; the plan's error must not depend on the chunk size."""
    from rcc_compression.compression import planner

    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(12, 16, generator=g) for _ in range(3)]
    weights += [torch.randn(16, 12, generator=g) for _ in range(2)]
    grams = [(lambda x: x.t() @ x)(torch.randn(40, w.shape[1], generator=g)) for w in weights]
    plan = {"pruning_rate": 0.5, "param_budget": 0.3}
    cases = [dict(order=("dare", "nullu"), rank_allocation="global", method="activation_aware", scorer="wanda"),
             dict(order=("nullu", "dare"), rank_allocation="layer", method="svd", scorer="magnitude")]
    for kw in cases:
        whole = planner.split_error(weights, plan, grams=grams, **kw)
        monkeypatch.setattr(planner, "SPLIT_CHUNK_BYTES", 1)  # one layer per chunk
        chunked = planner.split_error(weights, plan, grams=grams, **kw)
        monkeypatch.undo()
        assert 0 < whole < 1 and abs(chunked - whole) <= 1e-12 * whole, kw
