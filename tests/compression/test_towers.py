"""Towers, module matching a user can see, the dry run, per-tower bytes, and generation after compression."""

from __future__ import annotations

import pytest
import torch

from rcc_compression import compress_model, save_compressed
from rcc_compression.compression.layers import compressed_layers
from rcc_compression.compression.matching import check_patterns, match_layers
from rcc_compression.compression.towers import tower_bytes
from rcc_compression.errors import CompressionError
from rcc_compression.models import get_model
from rcc_compression.models.towers import classify_modules, tower_of


def test_every_module_of_tiny_llava_is_in_its_tower():
    w = get_model("tiny-llava")
    places = classify_modules(w)
    cfg = w.model.config
    leaves = [n for n, m in w.model.named_modules() if n and next(m.parameters(recurse=False), None) is not None]
    assert leaves and all(n in places for n in leaves)
    expected = {"model.vision_tower": "vision", "model.multi_modal_projector": "projector",
                "model.language_model": "language_model", "lm_head": "language_model"}
    for n in leaves:
        prefix = next(p for p in expected if n == p or n.startswith(p + "."))
        assert places[n].tower == expected[prefix], n
    # every tensor of the model is in a tower (nothing is "other")
    assert {tower_of("llava", k) for k in w.model.state_dict()} == {"vision", "projector", "language_model"}
    blocks = {n: p for n, p in places.items() if p.role == "block" and n.endswith("mlp.fc1")}
    vision_depth = cfg.vision_config.num_hidden_layers
    assert [p.position for n, p in sorted(blocks.items(), key=lambda kv: kv[1].index)][-1] == "last_block"
    assert places[f"model.vision_tower.encoder.layers.{vision_depth - 1}.mlp.fc1"].last
    assert places["model.vision_tower.encoder.layers.0.self_attn.q_proj"].position == "first_block"
    assert places["model.vision_tower.embeddings.patch_embedding"].role == "patch_embedding"
    assert places["model.multi_modal_projector.linear_1"].role == "projector"
    assert places["model.language_model.embed_tokens"].role == "embedding"


@pytest.mark.parametrize("name,towers", [("tiny-clip", {"vision", "text", "projector", "other"}),
                                          ("tiny-siglip", {"vision", "text", "projector", "other"}),
                                          ("tiny-blip", {"vision", "language_model"})])
def test_other_families_have_their_towers(name, towers):
    w = get_model(name)
    kind = w.model.config.model_type
    assert {tower_of(kind, k) for k in w.model.state_dict()} == towers


def test_a_pattern_that_matches_nothing_raises_with_the_nearest_names():
    w = get_model("tiny-llava")
    with pytest.raises(CompressionError, match=r"ignore pattern '\^vision_tower\\.' matches no Linear layer.*"
                                               r"nearest names: model\.vision_tower\.encoder"):
        check_patterns(w, None, [r"^vision_tower\."])
    with pytest.raises(CompressionError, match="compression.quant: targets pattern 'q_projection'.*nearest names"):
        compress_model(w, 0.5, progress=False, dry_run=True,
                       config={"compression": {"quant": {"targets": ["q_projection"]}}})
    with pytest.raises(CompressionError, match="not a valid regular expression"):
        check_patterns(w, ["(unclosed"], None)
    check_patterns(w, [r"language_model"], [r"vision_tower"])  # matching patterns pass


def test_the_attention_pooling_heads_linear_is_never_selected():
    rows = {r.name: r for r in match_layers(get_model("tiny-siglip"), targets=["."], ignore=[])}
    row = rows["vision_model.head.attention.out_proj"]
    assert not row.selected and "MultiheadAttention" in row.rule
    assert rows["vision_model.head.mlp.fc1"].selected


@pytest.mark.parametrize("kwargs", [
    {"compression_rate": 0.5},
    {"compression_rate": None, "config": {"compression": {
        "cascade": {"stages": ["dare", "quant"]}, "dare": {"pruning_rate": 0.5, "fine_tune_epochs": 0},
        "quant": {"bits": 4, "ignore": ["lm_head", r"\.0\.mlp"]}}}},
])
@pytest.mark.e2e
def test_dry_run_lists_exactly_the_layers_the_run_compresses(kwargs, capsys):
    report = compress_model("tiny-llava", progress=False, dry_run=True, **kwargs)
    printed = capsys.readouterr().out
    model = compress_model("tiny-llava", progress=False, **kwargs)
    planned = {r["name"] for r in report["layers"] if r["selected"]}
    assert planned == set(compressed_layers(model.model))
    assert len(report["layers"]) == sum(isinstance(m, torch.nn.Linear) for m in get_model("tiny-llava").modules())
    for r in report["layers"]:
        assert r["name"] in printed and r["tower"] in ("vision", "projector", "language_model")
        assert r["rule"]  # every row says which pattern decided it
    assert "lm_head" in printed and "default ignore" in printed or "no default targets" in printed
    tot = report["totals"]
    assert tot["planned_bytes"] is not None and tot["planned_bytes"] < tot["dense_bytes"]
    assert sum(t["planned_bytes"] for t in report["towers"].values()) == tot["planned_bytes"]


@pytest.mark.e2e
def test_per_tower_bytes_sum_to_the_checkpoint(tmp_path):
    dense = tower_bytes(get_model("tiny-llava"))
    model = compress_model("tiny-llava", 0.5, progress=False)
    towers = tower_bytes(model)
    manifest = save_compressed(model, tmp_path / "ckpt")
    stored = manifest["stored_bytes"]
    assert sum(t["stored_bytes"] for t in towers.values()) == stored["layers"] + stored["rest"]
    assert sum(t["dense_bytes"] for t in towers.values()) == stored["layers_dense"] + stored["rest"]
    assert {t: v["dense_bytes"] for t, v in towers.items()} == {t: v["dense_bytes"] for t, v in dense.items()}
    assert all(v["stored_bytes"] <= v["dense_bytes"] for v in towers.values())
    record = model.compression_stats["towers"]
    assert {t: v["stored_bytes"] for t, v in record.items()} == {t: v["stored_bytes"] for t, v in towers.items()}
    assert all(0.9 < v["agreement_alone"] <= 1.0 + 1e-6 for t, v in record.items() if v["compressed_layers"])


@torch.no_grad()
def _teacher_forced(wrapper, pixels, prompt_ids, tokens):
    ids = torch.tensor([prompt_ids + tokens])
    return wrapper.model(input_ids=ids, pixel_values=pixels, use_cache=False).logits[0, len(prompt_ids) - 1:-1]


@pytest.mark.e2e
@torch.no_grad()
def test_compressed_tiny_llava_generates_as_dense():
    """Rate 0: the same tokens; 2x: logits within a bound, and the same token wherever the margin exceeds it."""
    pix = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    dense = get_model("tiny-llava")
    want = dense.generate_caption(pix, max_length=8)
    same = compress_model("tiny-llava", 0.0, progress=False)
    assert compressed_layers(same.model)
    assert same.generate_caption(pix, max_length=8) == want
    half = compress_model("tiny-llava", 0.5, progress=False)
    assert half.compression_stats["achieved_rate"] >= 0.5
    prompt = dense.prompt_ids("")
    worst_rel, checked = 0.0, 0
    for i in range(pix.shape[0]):
        tokens = dense.model.generate(**dense.prompt_inputs([""]), pixel_values=pix[i:i + 1], max_new_tokens=8,
                                      do_sample=False, suppress_tokens=[dense.image_token_id],
                                      eos_token_id=None)[0, len(prompt):].tolist()
        d = _teacher_forced(dense, pix[i:i + 1], prompt, tokens)
        c = _teacher_forced(half, pix[i:i + 1], prompt, tokens)
        diff = (c - d).abs().max(dim=-1).values
        worst_rel = max(worst_rel, float((c - d).norm() / d.norm()))
        top2 = d.topk(2, dim=-1).values
        sure = (top2[:, 0] - top2[:, 1]) > 2 * diff  # no error this size can flip the argmax
        assert torch.equal(c.argmax(-1)[sure], d.argmax(-1)[sure])
        checked += int(sure.sum())
    assert worst_rel < 0.05, worst_rel
    assert checked >= 12  # the bound decides most positions


def test_cli_dry_run_prints_and_writes_the_report_without_a_run(tmp_path, capsys):
    from rcc_compression.cli import main

    args = ["compress", "--dry-run", "--model", "tiny-llava", "--set", "calibration.source=world",
            "--set", "calibration.num_batches=2", "--set", "calibration.batch_size=4",
            "--set", "compression.cascade.target_rate=0.75", "-q"]
    assert main([*args, "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    report = __import__("json").loads((tmp_path / "out" / "dry_run.json").read_text())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dry_run.json"]  # no run, no checkpoint
    assert "tower vision:" in out and "tower language_model:" in out and "lm_head" in out
    assert report["totals"]["planned_bytes"] <= 0.25 * report["totals"]["dense_bytes"] + 1
    assert main([*args, "--set", "compression.quant.ignore=[\"^vision_tower\"]"]) == 2
    assert "ignore pattern '^vision_tower' matches no Linear layer" in capsys.readouterr().err
    assert main(["compress", "--dry-run", "--model", "tiny-llava", "-q"]) == 2  # default calibration: noise
    assert "calibrates on image-text pairs" in capsys.readouterr().err


@pytest.mark.e2e
@pytest.mark.parametrize("probe", ["measured", "estimated"])
def test_plan_keeps_protected_layers_at_8_bits_unless_shown_idle(probe):
    """Projector and first/last blocks stay at >= 8 bits; the tower's last block, never read (LLaVA reads the
    penultimate layer), measures (or is estimated at) exactly 0 and is planned like any other layer."""
    from rcc_compression.compression.planner import Choice, keeps_precision

    cfg = {"compression": {"cascade": {"stages": ["dare", "nullu", "quant"]}, "towers": {"probe": probe}}}
    model = compress_model("tiny-llava", 0.85, progress=False, config=cfg)
    plan = model.compression_stats["plan"]
    towers = plan["towers"]
    sens, prot = towers["sensitivity"], towers["protection"]
    last = "model.vision_tower.encoder.layers.2."
    dead = [n for n in sens["layers"] if n.startswith(last)]
    assert dead and all(sens["layers"][n]["output_error"] == 0.0 for n in dead)
    assert all(n in prot["lifted"] for n in dead) and not any(n.startswith(last) for n in prot["protected"])
    assert "model.multi_modal_projector.linear_2" in prot["protected"] or \
        "model.multi_modal_projector.linear_2" in prot["lifted"]
    assert prot["roles_without_targets"]["patch_embedding"].startswith("no compressed Linear layer")
    assert probe in sens["probe"]
    assert set(sens["towers"]) == {"vision", "projector", "language_model"}
    assert prot["protected"] and not prot["released"]
    for name in prot["protected"]:
        entry = plan["layers"][name]
        c = Choice(**{k: entry[k] for k in ("pruning_rate", "bits", "group_size", "symmetric", "rank",
                                            "factor_bits", "keep_s")})
        assert keeps_precision(c, 8), (name, entry["choice"])
    assert model.compression_stats["achieved_rate"] >= 0.85 - 1e-6
    # without protection the same budget puts some protected layer below 8 bits
    free = compress_model("tiny-llava", 0.85, progress=False,
                          config={"compression": {**cfg["compression"], "towers": {"protect": [], "probe": probe}}})
    below = [n for n in prot["protected"] if not keeps_precision(Choice(**{
        k: free.compression_stats["plan"]["layers"][n][k] for k in ("pruning_rate", "bits", "group_size",
                                                                      "symmetric", "rank", "factor_bits",
                                                                      "keep_s")}), 8)]
    assert below
    # the protections are a prior: the same bytes without them are measured end to end, and the run records it
    assert "without protections" in plan["alternatives"]
    candidates = model.compression_stats["plan_choice"]["candidates"]
    assert {"per-layer plan", "without protections"} <= set(candidates)
    assert all(c["output_error"] >= 0 for c in candidates.values())



@pytest.mark.e2e
def test_protections_are_released_least_sensitive_first_when_the_rate_needs_it():
    cfg = {"compression": {"cascade": {"stages": ["dare", "nullu", "quant"]}}}
    model = compress_model("tiny-llava", 0.93, progress=False, config=cfg)
    prot = model.compression_stats["plan"]["towers"]["protection"]
    sens = model.compression_stats["plan"]["towers"]["sensitivity"]["layers"]
    assert prot["released"] and model.compression_stats["achieved_rate"] >= 0.93 - 1e-6
    kept = [n for n in prot["protected"] if n not in prot["released"]]
    assert all(sens[r]["weight"] <= sens[k]["weight"] for r in prot["released"] for k in kept)
