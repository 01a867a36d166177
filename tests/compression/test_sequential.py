"""The sequential pipeline: a model compressed a block at a time gives the whole pipeline's checkpoint.

Tiny CLIP models built in code (no download). What is checked: at rate 0 (and for a fixed config of
GPTQ codes) the checkpoint written block by block holds exactly the tensors and manifest entries the
whole cascade's holds; at 2x the held-out output error of one lies in the other's 95 % interval; a
run killed between blocks resumes at the next block and reaches the same checkpoint; a model read
from its checkpoint is never resident whole (the tensors alive during the run are bounded by the
parts outside the blocks and a few blocks, and none is larger than the largest weight).
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import multiprocessing
from pathlib import Path

import pytest
import torch
from torch import nn

from rcc_compression import compress_model
from rcc_compression.compression.blocks import BlockView, find_stacks
from rcc_compression.compression.cascade import CascadePipeline
from rcc_compression.compression.layers import compressed_layers
from rcc_compression.compression.placement import CheckpointSource, ResidentSource, block_devices, model_bytes
from rcc_compression.compression.registry import CompressionSection
from rcc_compression.compression.sequential import SequentialPipeline
from rcc_compression.compression.storage import load_compressed, read_manifest, read_tensors, save_compressed
from rcc_compression.compression.streams import Boundary
from rcc_compression.data.calibration import build_calibration_batches
from rcc_compression.errors import CheckpointError, CompressionError
from rcc_compression.models import get_model
from rcc_compression.models.clip import CLIPWrapper
from rcc_compression.models.tiny import tiny_clip_config

WORKER = Path(__file__).resolve().parents[1] / "reliability" / "crash_worker.py"
_spec = importlib.util.spec_from_file_location("rcc_crash_worker_seq", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

GPTQ4 = {"cascade": {"stages": ["quant"]}, "quant": {"bits": 4, "group_size": 32}}


def _batches(wrapper, n: int = 8):
    return build_calibration_batches(wrapper, "world", n, 8, 0)


def _same_checkpoint(a: Path, b: Path) -> None:
    ma, mb = read_manifest(a), read_manifest(b)
    la, ra = read_tensors(a, ma)
    lb, rb = read_tensors(b, mb)
    assert la.keys() == lb.keys() and ra.keys() == rb.keys()
    for name in la:
        assert la[name].keys() == lb[name].keys(), name
        for part in la[name]:
            assert torch.equal(la[name][part], lb[name][part]), (name, part)
    for key in ra:
        assert torch.equal(ra[key], rb[key]), key
    assert ma["layers"] == mb["layers"]


@pytest.fixture
def saved_clip(tmp_path):
    wrapper = get_model("tiny-clip")
    wrapper.save_pretrained(tmp_path / "dense")
    return wrapper, tmp_path / "dense"


# ------------------------------------------------------------------------------------------ pieces
def test_stacks_and_block_view_run_a_block_alone(tiny_clip):
    inner = tiny_clip.model
    names = [n for n, m in inner.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    stacks = find_stacks(inner, names)
    assert [s.name for s in stacks] == ["text_model.encoder.layers", "vision_model.encoder.layers"]
    assert stacks[1].blocks == ("vision_model.encoder.layers.0", "vision_model.encoder.layers.1")
    block = inner.get_submodule("vision_model.encoder.layers.1")
    view = BlockView("vision_model.encoder.layers.1", block)
    assert view.get_submodule("vision_model.encoder.layers.1.mlp.fc1") is block.mlp.fc1
    x = torch.randn(2, 17, 32)
    assert torch.equal(view(hidden_states=x, attention_mask=None)["hidden_states"], block(x, None))


def test_boundary_bounded_buffer_spills_to_files_and_reads_back(tmp_path):
    t = [torch.randn(4, 8, 16) for _ in range(3)]
    b = Boundary(None, max_bytes=t[0].numel() * 4 * 2)  # two fit; the third goes to a file
    b.set_now("s", t)
    assert all(torch.equal(b.get("s", j), t[j]) for j in range(3))
    assert b._tmp is not None and any(Path(b._tmp.name).rglob("*.safetensors"))
    persistent = Boundary(tmp_path / "streams")
    persistent.set_now("s", t)
    persistent.put("s", 0, t[1])
    persistent.advance()
    again = Boundary(tmp_path / "streams")
    again.reopen(1)
    assert torch.equal(again.get("s", 0), t[1])
    assert not (tmp_path / "streams" / "00000").exists()


def test_block_devices_follow_accelerate_on_several_gpus():
    """With a ``max_memory`` naming two GPUs, Accelerate places the blocks; none is split."""
    from accelerate import init_empty_weights
    from transformers import CLIPModel

    with init_empty_weights(include_buffers=False):
        model = CLIPModel(tiny_clip_config(60, hidden=64, layers=4))
    blocks = [f"{tower}_model.encoder.layers.{i}" for tower in ("text", "vision") for i in range(4)]
    block = model_bytes(model.get_submodule(blocks[0]))
    placed = block_devices(model, blocks, torch.device("cuda"), max_memory={0: 6 * block, 1: 100 * block, "cpu": 0})
    devices = [str(placed[b]) for b in blocks]  # in module order: GPU 0 filled first, then GPU 1
    assert set(devices) == {"cuda:0", "cuda:1"} and devices == sorted(devices), devices
    assert block_devices(model, blocks, torch.device("cpu")) == dict.fromkeys(blocks, torch.device("cpu"))


# ------------------------------------------------------------------------------------- equality
@pytest.mark.e2e
def test_fixed_config_gives_the_whole_pipelines_codes(tiny_clip):
    """GPTQ int4 of every layer: block by block, the same codes, scales and biases as the whole cascade."""
    batches = _batches(tiny_clip, 6)
    fit, hold = batches[:4], batches[4:]
    seq, whole = copy.deepcopy(tiny_clip.model), copy.deepcopy(tiny_clip.model)
    res = SequentialPipeline(CompressionSection.model_validate(GPTQ4), calibration_data=fit,
                             holdout_data=hold).run(ResidentSource(seq))
    CascadePipeline(CompressionSection.model_validate(GPTQ4), calibration_data=fit, holdout_data=hold).compress(whole)
    a, b = compressed_layers(seq), compressed_layers(whole)
    assert a.keys() == b.keys() and len(a) == 24
    for name in a:
        sa, sb = a[name].state(), b[name].state()
        for part in sa.quant:
            assert torch.equal(sa.quant[part].codes, sb.quant[part].codes), name
            assert torch.equal(sa.quant[part].scale, sb.quant[part].scale), name
    assert len(res.blocks) == 4 and res.gate["retention"] > 0.99


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["quant", "cascade"])
def test_rate_zero_checkpoints_are_identical(saved_clip, tmp_path, method):
    """From the model directory, block by block: the same files' tensors and manifest entries as the whole run."""
    wrapper, dense = saved_clip
    batches = _batches(wrapper)
    whole = compress_model(copy.deepcopy(wrapper), 0.0, method, calibration_data=batches, pipeline="whole",
                           progress=False)
    save_compressed(whole, tmp_path / "whole")
    seq = compress_model(str(dense), 0.0, method, calibration_data=batches, pipeline="sequential", progress=False,
                         run_dir=tmp_path / "run")
    manifest = read_manifest(tmp_path / "run" / "compressed")
    assert manifest["format_version"] == 4 and len(manifest["shards"]) == 4
    assert [b["index"] for b in manifest["pipeline"]["blocks"]] == [0, 1, 2, 3] and manifest["stages"] == []
    _same_checkpoint(tmp_path / "whole", tmp_path / "run" / "compressed")
    assert isinstance(seq, CLIPWrapper) and seq.tokenizer is not None  # processors saved and loaded
    assert [b["block"] for b in seq.compression_stats["pipeline"]["blocks"]] == [
        "vision_model.encoder.layers.0", "vision_model.encoder.layers.1",
        "text_model.encoder.layers.0", "text_model.encoder.layers.1"]


def _gate_error(stats):
    if "pipeline" in stats:  # sequential: the gate measured at the end
        return stats["gate"]["output_error"], stats["gate"]["output_error_ci"]
    last = [r for r in stats["records"] if r.get("passed") and r.get("output_error_ci")][-1]
    return last["output_error"], last["output_error_ci"]


@pytest.mark.e2e
def test_two_x_quality_equal_within_the_gates_interval(tiny_clip):
    batches = _batches(tiny_clip)
    fit, hold = batches[:6], batches[6:]
    out = {}
    for pipeline in ("whole", "sequential"):
        m = compress_model(copy.deepcopy(tiny_clip), 0.5, "cascade", calibration_data=fit, holdout_data=hold,
                           pipeline=pipeline, progress=False)
        out[pipeline] = (_gate_error(m.compression_stats), m.compression_stats["achieved_rate"])
    (whole_err, (lo, hi)), whole_rate = out["whole"]
    (seq_err, (slo, shi)), seq_rate = out["sequential"]
    assert lo <= seq_err <= hi and slo <= whole_err <= shi, out
    assert seq_rate == pytest.approx(0.5, abs=0.06) and whole_rate == pytest.approx(0.5, abs=0.06)


# -------------------------------------------------------------------------------------- resuming
def _child(directory: str, run_dir: str, kill_at: str) -> None:
    worker.install_kill_switch(kill_at)
    wrapper = get_model("tiny-clip")
    batches = _batches(wrapper, 6)
    SequentialPipeline(CompressionSection.model_validate({"cascade": {"stages": ["quant"]}}), rate=0.5,
                       calibration_data=batches[:4], holdout_data=batches[4:], run_dir=run_dir
                       ).run(CheckpointSource(directory), wrapper)


@pytest.mark.integration
@pytest.mark.parametrize("kill_at", [r"compress/boundary/00003/fit_dense-00000:1", r"survey/blocks/00002\.json:1"],
                         ids=["between-compressed-blocks", "during-the-survey"])
def test_killed_run_resumes_at_the_next_block_with_the_same_result(saved_clip, tmp_path, kill_at):
    wrapper, dense = saved_clip
    batches = _batches(wrapper, 6)

    def pipe(run: Path) -> SequentialPipeline:
        return SequentialPipeline(CompressionSection.model_validate({"cascade": {"stages": ["quant"]}}), rate=0.5,
                                  calibration_data=batches[:4], holdout_data=batches[4:], run_dir=run)

    pipe(tmp_path / "straight").run(CheckpointSource(dense), wrapper)
    child = multiprocessing.get_context("fork").Process(target=_child, args=(str(dense), str(tmp_path / "run"),
                                                                              kill_at))
    child.start()
    child.join(300)
    assert child.exitcode == -9  # SIGKILL, between blocks
    assert not (tmp_path / "run" / "compressed").exists()
    with pytest.raises(CheckpointError, match="resume it"):
        pipe(tmp_path / "run").run(CheckpointSource(dense), wrapper)
    done = []
    resumed = SequentialPipeline(CompressionSection.model_validate({"cascade": {"stages": ["quant"]}}), rate=0.5,
                                 calibration_data=batches[:4], holdout_data=batches[4:], run_dir=tmp_path / "run",
                                 block_callback=lambda r: done.append(r["index"]))
    result = resumed.run(CheckpointSource(dense), wrapper, resume=True)
    if "boundary" in kill_at:
        assert done == [2, 3]  # blocks 0 and 1 were written before the kill: not done again
    else:
        assert done == [0, 1, 2, 3]
    assert [b["index"] for b in result.blocks] == [0, 1, 2, 3]
    _same_checkpoint(tmp_path / "straight" / "compressed", tmp_path / "run" / "compressed")
    assert result.gate["retention"] == pytest.approx(
        read_manifest(tmp_path / "straight" / "compressed")["gate"]["retention"], abs=0)


# --------------------------------------------------------------------------------- memory bound
def _live_tensors() -> tuple[int, int]:
    """(bytes of every tensor storage alive in the process, the largest one), meta tensors aside."""
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and not obj.is_meta and obj.device.type == "cpu":
                st = obj.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, ReferenceError):
            continue
    return sum(seen.values()), max(seen.values(), default=0)


@pytest.mark.e2e
def test_a_model_read_from_its_checkpoint_is_never_materialised_whole(tmp_path):
    torch.manual_seed(0)
    tok = get_model("tiny-clip").tokenizer
    config = tiny_clip_config(len(tok), hidden=96, layers=12)
    wrapper = CLIPWrapper(__import__("transformers").CLIPModel(config).eval(), get_model("tiny-clip").image_processor,
                          tok, name="wide-clip")
    batches = build_calibration_batches(wrapper, "world", 4, 8, 0)
    wrapper.save_pretrained(tmp_path / "dense")
    total = model_bytes(wrapper.model)
    del wrapper
    gc.collect()
    baseline, _ = _live_tensors()
    peaks: list[tuple[int, int]] = []
    calls = [0]

    def probe(*_args) -> None:  # inside stages (a layer done) and after each block; a scan is slow: every 3rd
        calls[0] += 1
        if calls[0] % 3 == 0:
            live, big = _live_tensors()
            peaks.append((live - baseline, big))

    source = CheckpointSource(tmp_path / "dense")
    assert all(p.is_meta for n, p in source.model.named_parameters() if ".layers." in n)
    pipe = SequentialPipeline(CompressionSection.model_validate(GPTQ4), calibration_data=batches[:3],
                              holdout_data=batches[3:], run_dir=tmp_path / "run", progress_callback=probe,
                              block_callback=probe)
    result = pipe.run(source)
    assert len(result.blocks) == 24 and len(peaks) > 40
    most = max(p[0] for p in peaks)
    assert most < 0.3 * total, (most, total)  # a few blocks at most: 24 are compressed
    assert max(p[1] for p in peaks) < 0.05 * total  # no tensor holding the model (or a tower) whole
    assert all(p.is_meta for n, p in source.model.named_parameters() if ".layers." in n)  # given back
    loaded = load_compressed(tmp_path / "run" / "compressed")
    assert len(compressed_layers(loaded)) == 144


def test_sequential_needs_somewhere_to_write_a_model_read_from_disk(saved_clip):
    wrapper, dense = saved_clip
    pipe = SequentialPipeline(CompressionSection.model_validate(GPTQ4), calibration_data=_batches(wrapper, 4))
    with pytest.raises(CompressionError, match="needs a run_dir"):
        pipe.run(CheckpointSource(dense))


# ------------------------------------------------------------------------------ choosing, rcc compress
def test_auto_chooses_sequential_when_the_model_exceeds_the_share_and_says_so(saved_clip, caplog):
    from rcc_compression.config import load_config
    from rcc_compression.jobs.sequential import choose_pipeline

    wrapper, dense = saved_clip
    cfg = load_config(None, ["compression.cascade.sequential_memory_share=1e-9"])
    with caplog.at_level("WARNING"):
        chosen = choose_pipeline(str(dense), "auto", cfg)
    assert chosen.name == "sequential" and chosen.model_bytes == (dense / "model.safetensors").stat().st_size
    assert "compressed a block at a time" in chosen.why and chosen.why in caplog.text
    assert choose_pipeline(str(dense), "auto", load_config(None)).name == "whole"  # a few MB: well within
    assert choose_pipeline(wrapper, "whole", cfg).name == "whole"
    with pytest.raises(CompressionError, match="pipeline must be one of"):
        choose_pipeline(wrapper, "blocks", cfg)
    with pytest.raises(CompressionError, match="does not take dry_run"):
        compress_model(str(dense), 0.5, calibration_data=_batches(wrapper, 4), pipeline="sequential", dry_run=True)


@pytest.mark.e2e
def test_rcc_compress_takes_the_sequential_pipeline_and_records_every_block(saved_clip, tmp_path, capsys):
    import json

    from rcc_compression.cli import main

    _, dense = saved_clip
    run = tmp_path / "run"
    assert main(["compress", "--model", str(dense), "--set", "compression.cascade.pipeline=auto",
                 "--set", "compression.cascade.sequential_memory_share=1e-9", "--set", "calibration.source=synthetic",
                 "--set", "calibration.num_batches=3", "--set", "calibration.batch_size=4",
                 "--set", "compression.cascade.stages=[quant]", "--set", "compression.cascade.target_rate=0.7",
                 "--set", "evaluation.benchmarks=[]", "--no-eval", "-q", "--output", str(run)]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["pipeline"]["name"] == "sequential" and "block at a time" in results["pipeline"]["why"]
    blocks = results["pipeline"]["blocks"]
    assert len(blocks) == 4 and all(b["seconds"] > 0 and b["peak_rss"] > 0 and b["stored_bytes"] > 0 for b in blocks)
    assert 0.69 <= results["outcome"]["reached"] <= 0.76 and results["outcome"]["status"] == "met"  # int bit widths
    assert read_manifest(run / "compressed")["format_version"] == 4
    assert len(compressed_layers(load_compressed(run / "compressed"))) == 24
    assert json.loads((run / "run.json").read_text())["pipeline"]["name"] == "sequential"
    assert "MET: target compression rate (layers) 0.7000" in capsys.readouterr().out


@pytest.mark.e2e
def test_recovery_distils_each_block_against_the_dense_blocks_outputs(tiny_clip):
    """int3 rounding, then alphaedit's scales distilled block by block: each block's held-out error drops."""
    from rcc_compression.jobs.api import distiller
    from rcc_compression.training.settings import TrainingSection

    batches = _batches(tiny_clip)
    section = CompressionSection.model_validate({
        "cascade": {"stages": ["quant", "alphaedit"], "recovery_skip_error": None, "validation_threshold": 0.0},
        "quant": {"bits": 3, "rounding": "nearest"}, "alphaedit": {"num_epochs": 30, "learning_rate": 1e-2}})
    res = SequentialPipeline(section, calibration_data=batches[:6], holdout_data=batches[6:],
                             distill=distiller(TrainingSection())).run(ResidentSource(copy.deepcopy(tiny_clip.model)))
    recovered = [s for b in res.blocks for s in b["steps"] if s["stage"] == "alphaedit"]
    assert len(recovered) == 4
    assert not any("undone" in s or "skipped" in s for s in recovered), recovered
    # measured: 0.013 -> 0.006, 0.011 -> 0.004, 0.146 -> 0.021, 0.070 -> 0.006 (relative squared error)
    assert all(s["error_after"][0] < 0.7 * s["error_before"][0] for s in recovered), recovered


@pytest.mark.e2e
def test_without_calibration_data_blocks_are_walked_in_module_order(tiny_clip):
    """Round-to-nearest int8 from the weights alone: no forward pass, the whole cascade's codes, gate not measured."""
    section = {"cascade": {"stages": ["quant"], "validation_threshold": 0.0},
               "quant": {"bits": 8, "rounding": "nearest"}}
    seq, whole = copy.deepcopy(tiny_clip.model), copy.deepcopy(tiny_clip.model)
    res = SequentialPipeline(CompressionSection.model_validate(section)).run(ResidentSource(seq))
    CascadePipeline(CompressionSection.model_validate(section), num_synthetic_batches=0).compress(whole)
    assert [b["block"] for b in res.blocks][0] == "text_model.encoder.layers.0"  # module order, nothing caught
    a, b = compressed_layers(seq), compressed_layers(whole)
    assert a.keys() == b.keys() and len(a) == 24
    for name in a:
        assert torch.equal(a[name].state().quant["weight"].codes, b[name].state().quant["weight"].codes), name
    assert res.gate["retention"] is None and res.gate["gate"].startswith("not measured")


@pytest.mark.integration
def test_rcc_compress_resume_continues_a_killed_sequential_run(saved_clip, tmp_path):
    """``rcc compress`` killed between blocks, then ``--resume``: the sequential pipeline is kept (not chosen
    again) and the checkpoint equals an uninterrupted run's."""
    import json

    from rcc_compression.cli import main
    from rcc_compression.jobs.sequential import resumed_pipeline

    _, dense = saved_clip
    args = ["compress", "--model", str(dense), "--set", "compression.cascade.pipeline=sequential",
            "--set", "calibration.source=synthetic", "--set", "calibration.num_batches=3",
            "--set", "calibration.batch_size=4", "--set", "compression.cascade.stages=[quant]",
            "--set", "compression.cascade.target_rate=0.6", "--set", "evaluation.benchmarks=[]", "--no-eval", "-q"]
    assert main([*args, "--output", str(tmp_path / "straight")]) == 0
    child = multiprocessing.get_context("fork").Process(
        target=worker.run_cli, args=([*args, "--output", str(tmp_path / "run")],
                                     r"sequential/compress/boundary/00003/fit_dense-00000:1",
                                     str(tmp_path / "child.log")))
    child.start()
    child.join(300)
    assert child.exitcode == -9
    assert resumed_pipeline(tmp_path / "run").name == "sequential"
    assert main(["compress", "--resume", str(tmp_path / "run"), "--no-eval", "-q"]) == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["pipeline"]["why"].startswith("resumed")
    blocks = json.loads((tmp_path / "run" / "results.json").read_text())["pipeline"]["blocks"]
    assert [b["index"] for b in blocks] == [0, 1, 2, 3]
    _same_checkpoint(tmp_path / "straight" / "compressed", tmp_path / "run" / "compressed")
