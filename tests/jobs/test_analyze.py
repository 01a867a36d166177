"""``rcc analyze RUN`` on a tiny compressed CLIP: every report written, measures consistent, parts resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rcc_compression.cli import main
from rcc_compression.config import load_config
from rcc_compression.jobs import analyze as analyze_job
from rcc_compression.jobs.analyze import run_analyze, world_of

from .conftest import tiny_config


@pytest.mark.e2e
def test_analyze_a_compressed_run(tiny_world: Path, tmp_path: Path) -> None:
    cfg_file = tiny_config(tmp_path / "cfg", tiny_world, ["dare", "nullu"])
    run = tmp_path / "run"
    assert main(["compress", "--config", str(cfg_file), "-o", str(run), "--no-eval", "-q"]) == 0
    out = run / "analysis"
    picked = ["text_model.encoder.layers.0.mlp.fc1", "vision_model.encoder.layers.1.self_attn.v_proj",
              "vision_model.encoder.layers.0.mlp.fc2"]
    assert main(["analyze", str(run), "--embedding", "tsne", "--max-items", "64", "-q",
                 *[a for n in picked for a in ("--layer", n)]]) == 0
    for name in ("subspace", "nullspace", "sensitivity", "embeddings"):
        for ext in ("json", "md"):
            assert (out / f"{name}.{ext}").is_file(), f"{name}.{ext}"
    for png in ("grassmann.png", "sensitivity.png", "embeddings_tsne.png"):
        assert (out / png).stat().st_size > 1000
    sub = json.loads((out / "subspace.json").read_text())
    sens = json.loads((out / "sensitivity.json").read_text())
    layers = set(sub["layers"])
    assert {r["layer"] for r in sens["layers"]} == set(picked) and len(layers) > 4 and set(picked) <= layers
    for v in sub["layers"].values():
        assert 0.0 <= v["rows"]["geodesic_normalised"] <= 1.0 and 0.0 <= v["columns"]["overlap"] <= 1.0 + 1e-9
        assert v["relative_weight_error"] > 0
    assert [r["rank"] for r in sens["layers"]] == [1, 2, 3]
    drops = [r["gate_drop"] for r in sens["layers"]]
    assert drops == sorted(drops, reverse=True)
    null = json.loads((out / "nullspace.json").read_text())
    assert set(null["layers"]) == layers
    for v in null["layers"].values():
        dims = [t["null_dim"] for t in v["tolerances"]]
        assert dims == sorted(dims)  # a looser tolerance never finds fewer null directions
        assert all(0.0 <= t["weight_energy_share"] <= 1.0 for t in v["tolerances"])
    emb = json.loads((out / "embeddings.json").read_text())
    assert emb["images"]["items"] == 64 and 0.0 < emb["images"]["neighbourhood_overlap"] <= 1.0
    # a second call keeps the parts already written; --against adds the run-to-run comparison
    stamp = (out / "sensitivity.json").stat().st_mtime_ns
    rep = run_analyze(run, parts=["sensitivity", "subspace"], against=run)
    assert (out / "sensitivity.json").stat().st_mtime_ns == stamp
    assert all(v["rows"]["geodesic"] < 1e-6 for v in rep["subspace"]["against"]["layers"].values())


def test_the_world_is_found_from_part_specs(tiny_world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Embedding maps need the world; configs name its parts (world:colour_shape, DIR#captions), not only 'world'."""
    monkeypatch.setattr(analyze_job, "ensure_world", lambda seed, splits: Path("/generated/world"))

    def found(*datasets: str) -> Path | None:
        return world_of(load_config(None, data={"evaluation": {"datasets": list(datasets)}}), "test")

    assert found("world:colour_shape", "world:captions") == Path("/generated/world")
    assert found("world") == Path("/generated/world")
    assert found(f"{tiny_world}#colour_shape") == tiny_world and found(str(tiny_world)) == tiny_world
    assert found("coco_karpathy") is None
