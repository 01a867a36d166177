"""CompressedLinear, bit packing, the saved format and dense export."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from rcc_compression.compression.layers import (
    CompressedLinear,
    compressed_layers,
    merge_all,
    pack_bits,
    replace_module,
    unpack_bits,
)
from rcc_compression.compression.storage import export_dense, load_compressed, save_compressed, stored_bytes
from rcc_compression.errors import CheckpointError


def _full_layer(m: int = 12, n: int = 20, seed: int = 0) -> CompressedLinear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(n, m)
    layer = CompressedLinear.from_linear(lin)
    mask = torch.rand(m, n, generator=g) > 0.6
    layer.set_sparse(torch.randn(m, n, generator=g), mask)
    layer.set_low_rank(torch.randn(m, 3, generator=g), torch.randn(3, n, generator=g))
    layer.set_scales(torch.rand(n, generator=g) + 0.5, torch.rand(m, generator=g) + 0.5)
    return layer


def test_from_linear_is_exact():
    lin = nn.Linear(16, 8)
    x = torch.randn(5, 16)
    assert torch.equal(CompressedLinear.from_linear(lin)(x), lin(x))


def test_forward_matches_formula_and_merge():
    layer = _full_layer()
    x = torch.randn(7, 20, dtype=torch.float32)
    S = layer.weight.detach() * layer.mask
    W = layer.a_out.detach()[:, None] * (S + layer.lr_B.detach() @ layer.lr_A.detach()) * layer.a_in.detach()[None, :]
    expected = x @ W.t() + layer.bias.detach()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.merge()(x), expected, rtol=1e-5, atol=1e-5)


def test_training_mode_keeps_pruned_entries_at_zero():
    layer = _full_layer()
    layer.train()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(4, 20)).pow(2).sum().backward()
    opt.step()
    assert torch.all(layer.weight.detach()[~layer.mask] == 0)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (8, 8), (7, 13)])
def test_pack_bits_roundtrip(shape):
    mask = torch.rand(shape) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_bits(packed, shape), mask)


def _compress_some(wrapper, rate: float = 0.8, rank: int = 4):
    inner = wrapper.model
    for name, mod in list(inner.named_modules()):
        if isinstance(mod, nn.Linear) and ".mlp." in name:
            layer = CompressedLinear.from_linear(mod)
            w = mod.weight.detach()
            k = int(w.numel() * (1 - rate))
            mask = torch.zeros(w.numel(), dtype=torch.bool)
            mask[w.abs().flatten().topk(k).indices] = True
            layer.set_sparse(w, mask.view_as(w))
            layer.set_low_rank(torch.randn(w.shape[0], rank) * 0.01, torch.randn(rank, w.shape[1]) * 0.01)
            replace_module(inner, name, layer)
    return wrapper


def test_save_load_roundtrip_outputs_equal(tiny_clip, tmp_path):
    model = _compress_some(tiny_clip)
    batch = model.synthetic_batch(3, torch.Generator().manual_seed(1))
    before = model(**batch)
    save_compressed(model, tmp_path / "ckpt")
    loaded = load_compressed(tmp_path / "ckpt")
    after = loaded(**batch)
    assert torch.equal(before.logits_per_image, after.logits_per_image)
    assert torch.equal(before.text_embeds, after.text_embeds)
    assert loaded.tokenizer is not None  # processors travel with the checkpoint


def test_stored_bytes_match_files_within_2_percent(tiny_clip, tmp_path):
    model = _compress_some(tiny_clip, rate=0.9)
    manifest = save_compressed(model, tmp_path / "ckpt")
    reported = sum(stored_bytes(m) for m in compressed_layers(model.model).values())
    on_disk = (tmp_path / "ckpt" / "layers.safetensors").stat().st_size
    header = int.from_bytes((tmp_path / "ckpt" / "layers.safetensors").read_bytes()[:8], "little")
    assert reported == manifest["stored_bytes"]["layers"]
    assert abs((on_disk - 8 - header) - reported) / reported < 0.02
    assert abs(on_disk - reported) / on_disk < 0.25  # the JSON header is the only other content


def test_both_sparse_encodings_roundtrip():
    for density in (0.5, 0.02):  # bitmask wins at high density, CSR at low
        lin = nn.Linear(64, 32)
        layer = CompressedLinear.from_linear(lin)
        mask = torch.rand(32, 64) < density
        layer.set_sparse(lin.weight.detach(), mask)
        from rcc_compression.compression.storage import choose_encoding, decode_layer, encode_layer

        enc = choose_encoding(layer)
        assert enc == ("bitmask" if density == 0.5 else "csr")
        back = decode_layer(encode_layer(layer), {"in_features": 64, "out_features": 32, "dtype": "float32",
                                                  "encoding": enc})
        x = torch.randn(3, 64)
        assert torch.equal(back(x), layer(x))
        assert sum(t.numel() * t.element_size() for t in encode_layer(layer).values()) == stored_bytes(layer)


def test_export_dense_loads_with_plain_transformers(tiny_clip, tmp_path):
    from transformers import CLIPModel

    model = _compress_some(tiny_clip)
    batch = model.synthetic_batch(2, torch.Generator().manual_seed(2))
    expected = model(**batch).logits_per_image
    export_dense(model, tmp_path / "dense")
    plain = CLIPModel.from_pretrained(tmp_path / "dense")
    torch.testing.assert_close(plain(**batch).logits_per_image, expected, rtol=1e-4, atol=1e-4)
    assert not compressed_layers(model.model) == {}  # the original stays compressed


def test_export_dense_blip(tiny_blip, tmp_path):
    from transformers import BlipForConditionalGeneration

    model = _compress_some(tiny_blip)
    batch = model.synthetic_batch(2, torch.Generator().manual_seed(3))
    expected = model(**batch).logits
    export_dense(model, tmp_path / "dense")
    plain = BlipForConditionalGeneration.from_pretrained(tmp_path / "dense")
    torch.testing.assert_close(plain(**batch).logits, expected, rtol=1e-4, atol=1e-4)


def test_load_refuses_tampered_and_unknown(tiny_clip, tmp_path):
    model = _compress_some(tiny_clip)
    save_compressed(model, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="not empty"):
        save_compressed(model, tmp_path / "ckpt")
    f = tmp_path / "ckpt" / "layers.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_compressed(tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "ckpt" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format_version"):
        load_compressed(tmp_path / "ckpt")


def test_merge_all_replaces_every_compressed_layer(tiny_clip):
    model = _compress_some(tiny_clip)
    batch = model.synthetic_batch(2, torch.Generator().manual_seed(4))
    expected = model(**batch).image_embeds
    merge_all(model.model)
    assert compressed_layers(model.model) == {}
    torch.testing.assert_close(model(**batch).image_embeds, expected, rtol=1e-5, atol=1e-5)


def test_calibration_stats_stream_and_share_identical_inputs(tiny_clip):
    from rcc_compression.compression.calibration import collect_layer_stats

    names = ["vision_model.encoder.layers.0.self_attn.q_proj", "vision_model.encoder.layers.0.self_attn.k_proj",
             "vision_model.encoder.layers.0.mlp.fc1"]
    g = torch.Generator().manual_seed(0)
    batches = [tiny_clip.synthetic_batch(2, g) for _ in range(3)]
    stats = collect_layer_stats(tiny_clip.model, names, batches, gram=True)
    assert stats[names[0]] is stats[names[1]]  # q and k read the same tensor
    seen = []
    h = tiny_clip.model.get_submodule(names[2]).register_forward_pre_hook(
        lambda m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1]).double()))
    for b in batches:
        tiny_clip.model(**b)
    h.remove()
    x = torch.cat(seen)
    st = stats[names[2]]
    assert st.count == x.shape[0]
    torch.testing.assert_close(st.gram.double(), x.t() @ x, rtol=1e-5, atol=1e-5)  # accumulated in float32
    torch.testing.assert_close(st.col_norm, x.norm(dim=0))
    torch.testing.assert_close(st.mean_abs, x.abs().mean(0))


@pytest.mark.parametrize("mode", ["factored", "merged", "csr"])
def test_execution_modes_compute_the_same(mode):
    layer = _full_layer(24, 40, seed=5).eval()
    x = torch.randn(2, 7, 40)
    expected = layer(x)
    assert layer.set_execution(mode) and layer.execution == mode
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.train()  # training computes with the parameters themselves; the kernel's copy goes stale
    with torch.no_grad():
        layer.a_out.mul_(2)
        layer.lr_B.add_(0.5)
    trained = layer(x)
    layer.eval()
    assert layer.execution == mode  # the choice stays, its state is rebuilt from the moved parameters
    torch.testing.assert_close(layer(x), trained, rtol=1e-5, atol=1e-5)
    layer.set_execution("factored")
    torch.testing.assert_close(layer(x), trained, rtol=1e-5, atol=1e-5)


def test_optimize_execution_keeps_outputs(tiny_clip):
    from rcc_compression.evaluation.efficiency import optimize_execution

    model = _compress_some(tiny_clip, rate=0.95)
    batch = model.synthetic_batch(2, torch.Generator().manual_seed(6))
    expected = model(**batch).logits_per_image
    chosen = optimize_execution(model, batch, iters=2)
    assert set(chosen) == set(compressed_layers(model.model))
    assert {r["kernel"] for r in chosen.values()} <= {"factored", "merged", "csr"}
    for name, rec in chosen.items():  # what each layer runs and holds, as measured
        layer = model.model.get_submodule(name)
        assert rec["kernel"] == layer.execution and rec["held_bytes"] == layer.held_bytes()
        assert rec["tried"]["factored"] > 0 and "w8a8" in rec["tried"]  # refused, with the reason
    torch.testing.assert_close(model(**batch).logits_per_image, expected, rtol=1e-4, atol=1e-4)


def test_kernels_survive_an_evaluation(tiny_clip):
    """A wrapper's mode follows its model: evaluating (which restores the caller's mode) keeps the kernels."""
    from rcc_compression import evaluate_model

    model = _compress_some(tiny_clip, rate=0.95)
    assert not model.training and not model.model.training
    for layer in compressed_layers(model.model).values():
        assert layer.set_execution("merged")
    evaluate_model(model, benchmarks=["efficiency"], bootstrap_samples=0)
    assert not model.model.training
    assert {m.execution for m in compressed_layers(model.model).values()} == {"merged"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_delta_checkpoint_checks_its_base_and_saves_bfloat16(tmp_path, dtype):
    """Issue 10, item 5: the base's sha256 is checked on load (an unrelated base is refused, not silently used),
    and a bfloat16 delta model saves and loads."""
    import copy

    from rcc_compression.compression.cascade import CascadePipeline
    from rcc_compression.config import load_config

    from .conftest import MLP, batches_for

    torch.manual_seed(0)
    model = MLP()
    base = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    cfg = load_config(None, data={"compression": {
        "dare": {"pruning_rate": 0.5, "scorer": "random", "target": "delta", "iterations": 1, "fine_tune_epochs": 0,
                 "targets": ["^fc"]},
        "cascade": {"stages": ["dare"], "validation_threshold": 0.0}}}).compression
    CascadePipeline(cfg, calibration_data=batches_for(24, 3), reference_model=base).compress(model)
    model.to(dtype)
    base.to(dtype)
    x = torch.randn(5, 24).to(dtype)
    expected = model(x)
    save_compressed(model, tmp_path / "ckpt")
    loaded = load_compressed(tmp_path / "ckpt", model=MLP().to(dtype), reference_model=base)
    assert torch.equal(loaded(x), expected)
    other = MLP().to(dtype)  # an unrelated base
    with pytest.raises(CheckpointError, match="not the base this checkpoint was compressed against"):
        load_compressed(tmp_path / "ckpt", model=MLP().to(dtype), reference_model=other)
