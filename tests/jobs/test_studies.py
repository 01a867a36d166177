"""``rcc ablate`` and ``rcc order`` end to end on a tiny CLIP: tables with CIs and p-values, equal bytes,
resumption that reruns only what is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rcc_compression.cli import main
from rcc_compression.config import load_config
from rcc_compression.errors import ConfigError
from rcc_compression.jobs import studies
from rcc_compression.jobs.studies import make_spec, order_variants, run_ordering, subset_variants

from .conftest import tiny_config


def test_variant_sets() -> None:
    assert [v.name for v in subset_variants(["dare", "nullu", "alphaedit"])] == [
        "full", "dare+nullu", "dare+alphaedit", "nullu+alphaedit", "dare", "nullu", "alphaedit"]
    names = [v.name for v in order_variants(["dare", "nullu", "alphaedit"])]
    assert len(names) == 6 == len(set(names)) and names[0] == "dare > nullu > alphaedit"


@pytest.mark.e2e
def test_ablation_end_to_end_and_resume(tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_file = tiny_config(tmp_path / "cfg", tiny_world, ["nullu", "alphaedit"])
    variants = tmp_path / "variants.yaml"
    variants.write_text("variants:\n  per-layer-ranks: {compression.nullu.budget_allocation: layer}\n")
    out = tmp_path / "ablate"
    assert main(["ablate", "--config", str(cfg_file), "--seeds", "2", "--variants", str(variants), "-o", str(out),
                 "-q"]) == 0
    res = json.loads((out / "results.json").read_text())
    rows = {r["variant"]: r for r in res["rows"]}
    assert list(rows) == ["full", "nullu", "alphaedit", "per-layer-ranks"]
    assert not rows["alphaedit"]["applicable"] and "stored bytes" in rows["alphaedit"]["reason"]
    metric = "zero_shot " + str(tiny_world) + "#colour_shape top1"
    assert metric in res["metrics"] and res["items"][metric] == 64
    applicable = [r for r in res["rows"] if r["applicable"]]
    for r in applicable:  # equal stored bytes: every variant planned to the same rate of its layers
        assert r["compression_rate_layers"]["mean"] == pytest.approx(0.5, abs=0.02)
        agg = r["metrics"][metric]
        assert agg["ci_low"] <= agg["mean"] <= agg["ci_high"] and len(agg["values"]) == 2
    # every comparison against the reference has p-values, Holm-adjusted (never below the raw value)
    n = 0
    for r in applicable:
        if r["reference"]:
            assert r["vs_reference"] == {}
            continue
        for m in res["metrics"]:
            p = r["vs_reference"][m]["paired_permutation"]
            assert 0 < p["p_value"] <= p["p_holm"] <= 1
            n += 1
    assert n == res["comparisons"] == 2 * len(res["metrics"])
    md = (out / "results.md").read_text()
    assert "| `alphaedit` | n/a" in md and "p (Holm)" in md
    assert (out / "results.csv").read_text().count("\n") == 1 + 3 * len(res["metrics"]) + 1
    assert list(out.glob("retention_*.png"))
    # resume: a lost unit and the table are redone; nothing else runs again
    (out / "runs" / "nullu" / "seed-1" / "items.json").unlink()
    (out / "results.json").unlink()
    calls: list[str] = []
    real = studies.run_compress
    monkeypatch.setattr(studies, "run_compress", lambda cfg, d, **kw: calls.append(str(d)) or real(cfg, d, **kw))
    assert main(["ablate", "--resume", str(out), "-q"]) == 0
    assert calls == [str(out / "runs" / "nullu" / "seed-1")]
    again = json.loads((out / "results.json").read_text())
    assert again["rows"] == res["rows"]  # the rerun unit reproduces its numbers exactly


@pytest.mark.e2e
def test_order_study_and_bad_requests(tiny_world: Path, tmp_path: Path) -> None:
    cfg_file = tiny_config(tmp_path / "cfg", tiny_world, ["dare", "nullu"])
    cfg = load_config(cfg_file, ["compression.cascade.lowrank_share=0.5"])
    assert [v.name for v in make_spec("order", cfg, 1).variants] == ["dare > nullu", "nullu > dare"]
    res = run_ordering(cfg, tmp_path / "order", seeds=1)
    assert [r["variant"] for r in res["rows"]] == ["dare > nullu", "nullu > dare"]
    # a fixed byte split keeps both stages in every order (left to itself the planner may drop one)
    assert [r["stages_run"] for r in res["rows"]] == [["dare > nullu"], ["nullu > dare"]]
    assert all(r["compression_rate_layers"]["mean"] == pytest.approx(0.5, abs=0.02) for r in res["rows"])
    other = res["rows"][1]["vs_reference"]
    assert set(other) == set(res["metrics"]) and all("wilcoxon" in v for v in other.values())
    named = studies.Variant("layer-ranks", {"compression.nullu.budget_allocation": "layer"})
    only = make_spec("ablate", cfg, 2, [named], subsets=False)
    assert [v.name for v in only.variants] == ["full", "layer-ranks"] and only.seeds == [0, 1]
    with pytest.raises(ConfigError, match="target_rate"):
        make_spec("ablate", load_config(cfg_file, ["compression.cascade.target_rate=null"]), 1)
    assert main(["order", "--resume", str(tmp_path / "order"), "--seeds", "2", "--rate", "0.3", "-q"]) == 2
