"""Peak memory: teacher weights and rollback copies in files, masks at one bit per entry, memory handed back."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from rcc_compression import CompressionPipeline
from rcc_compression.compression.cascade import compression_summary
from rcc_compression.compression.layers import CompressedLinear, compressed_layers, count_bits, pack_bits, unpack_bits
from rcc_compression.compression.offload import (
    OffloadedLinear,
    ResidentTensor,
    StoredTensor,
    TensorStore,
    materialize,
    remove_orphans,
    teacher_copy,
)
from rcc_compression.config import load_config
from rcc_compression.errors import CompressionError

ROOT = Path(__file__).resolve().parents[2]
FAST = {"dare": {"fine_tune_epochs": 0, "iterations": 2, "pruning_rate": 0.7},
        "nullu": {"rank_reduction": None, "energy_threshold": None, "param_budget": 0.2},
        "alphaedit": {"num_epochs": 1}}


def _section(**cascade):
    return load_config(None, data={"compression": {**FAST, "cascade": cascade}}).compression


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])
@pytest.mark.parametrize("shape", [(7, 5), (), (0, 3), (3, 1, 2)])
def test_store_gives_back_exactly_what_was_put(tmp_path, dtype, shape):
    t = (torch.randn(shape) * 10).to(dtype)
    disk, mem = TensorStore("disk", tmp_path), TensorStore("memory")
    h = disk.put(t)
    assert isinstance(h, StoredTensor) and isinstance(mem.put(t), ResidentTensor)
    assert h.nbytes == t.numel() * t.element_size()
    back = h.load()
    assert back.dtype == dtype and back.shape == t.shape and torch.equal(back, t)
    kept = mem.put(t)
    if t.numel():
        flat = t.view(-1)
        flat[0] = ~flat[0] if dtype == torch.bool else flat[0] + 1
        assert not torch.equal(kept.load(), t) and not torch.equal(h.load(), t)  # copies, not views


def test_files_go_with_their_handles_and_the_directory_with_the_store(tmp_path):
    store = TensorStore("disk", tmp_path)
    root = store.dir
    a, b = store.put(torch.ones(4)), store.put(torch.zeros(4))
    assert len(list(root.iterdir())) == 2
    path_a = a.path
    del a
    gc.collect()
    assert not path_a.exists() and b.path.exists()
    del store
    gc.collect()
    assert root.exists() and torch.equal(b.load(), torch.zeros(4))  # a live handle keeps its directory
    del b
    gc.collect()
    assert not root.exists()


def test_store_errors_name_the_key(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CompressionError, match="offload_dir"):
        TensorStore("disk", blocker / "sub")
    with pytest.raises(CompressionError, match="allowed: disk, memory"):
        TensorStore("ram")
    store = TensorStore("disk", tmp_path)
    h = store.put(torch.ones(1000))
    h.path.write_bytes(b"\0" * 10)
    with pytest.raises(CompressionError, match="truncated"):
        h.load()


def test_offloaded_linear_is_the_dense_layer():
    torch.manual_seed(0)
    lin = nn.Linear(12, 7)
    store = TensorStore("disk")
    off = OffloadedLinear(store.put(lin.weight), lin.bias.detach().clone())
    x = torch.randn(3, 12)
    assert isinstance(off, nn.Linear) and [n for n, _ in off.named_parameters()] == ["bias"]
    assert torch.equal(off(x), lin(x)) and torch.equal(off.weight, lin.weight)
    res = off.materialize()
    assert type(res) is nn.Linear and torch.equal(res(x), lin(x)) and not res.weight.requires_grad
    with pytest.raises(CompressionError, match="dtype"):
        off.to(torch.float64)


def test_teacher_copy_keeps_linear_weights_out_of_memory(tiny_clip):
    model = tiny_clip.model
    batch = tiny_clip.synthetic_batch(2, torch.Generator().manual_seed(0))
    dense_out = model(**batch).image_embeds
    linear_bytes = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear))
    teacher = teacher_copy(model, TensorStore("disk"))
    offloaded = [m for m in teacher.modules() if isinstance(m, OffloadedLinear)]
    assert len(offloaded) == sum(isinstance(m, nn.Linear) for m in model.modules())
    model_ids = {id(p) for p in model.parameters()}
    own = [p for p in teacher.parameters() if id(p) not in model_ids]  # the rest is shared, not copied
    assert sum(p.numel() * p.element_size() for p in own) < 0.05 * linear_bytes  # biases only
    assert torch.equal(teacher(**batch).image_embeds, dense_out)
    materialize(teacher)
    assert not any(isinstance(m, OffloadedLinear) for m in teacher.modules())
    assert torch.equal(teacher(**batch).image_embeds, dense_out)


@pytest.mark.e2e
def test_disk_and_memory_offload_give_the_same_run(tmp_path):
    from rcc_compression.models import get_model

    results = {}
    for mode in ("disk", "memory"):
        model = get_model("tiny-clip")
        pipe = CompressionPipeline(_section(validation_threshold=0.0, offload=mode, offload_dir=str(tmp_path)), seed=1)
        pipe.compress(model)
        batch = model.synthetic_batch(3, torch.Generator().manual_seed(5))
        results[mode] = (model(**batch).image_embeds.detach(), [r["retention"] for r in pipe.records],
                         compression_summary(model.model))
        if mode == "disk":
            teacher_weights = [m for m in pipe.dense_model.modules() if isinstance(m, OffloadedLinear)]
            assert teacher_weights and any(tmp_path.iterdir())
            pipe.rollback_to_stage("dare")  # read back from the files
            after_dare = compression_summary(model.model)
            assert after_dare["stored_bytes"] >= results[mode][2]["stored_bytes"]
    assert torch.equal(results["disk"][0], results["memory"][0])
    assert results["disk"][1] == results["memory"][1] and results["disk"][2] == results["memory"][2]


def test_a_failed_gate_restores_from_offloaded_copies(tiny_clip):
    before = {n: m.weight.detach().clone() for n, m in tiny_clip.model.named_modules() if isinstance(m, nn.Linear)}
    pipe = CompressionPipeline(_section(validation_threshold=1.0, stages=["dare"], offload="disk"))
    pipe.compress(tiny_clip)
    assert pipe.stopped_early and pipe.records[-1]["rolled_back"]
    for name, layer in compressed_layers(tiny_clip.model).items():  # the dense start came back from the files
        assert torch.equal(layer.effective_weight(), before[name])


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (64, 48), (7, 13)])
def test_packed_mask_round_trip_and_count(shape):
    g = torch.Generator().manual_seed(sum(shape))
    mask = torch.rand(shape, generator=g) > 0.6
    bits = pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_bits(bits, shape), mask) and count_bits(bits) == int(mask.sum())
    flat = mask.reshape(-1).tolist() + [False] * ((-mask.numel()) % 8)
    expected = [int("".join("1" if b else "0" for b in flat[i:i + 8]), 2) for i in range(0, len(flat), 8)]
    assert bits.tolist() == expected  # most significant bit first, as checkpoints store it


def test_layer_holds_its_mask_at_one_bit_per_entry():
    torch.manual_seed(0)
    layer = CompressedLinear.from_linear(nn.Linear(40, 24))
    mask = torch.rand(24, 40) > 0.5
    layer.set_sparse(layer.weight.detach(), mask)
    assert layer.mask_bits.numel() == 24 * 40 // 8 and "mask_bits" in dict(layer.named_buffers())
    assert torch.equal(layer.mask, mask) and layer.nnz() == int(mask.sum()) and layer.is_sparse
    assert torch.equal(layer.weight.detach() != 0, mask & (layer.weight.detach() != 0))
    layer.train()
    assert layer.mask is layer.mask  # unpacked once while training
    layer.eval()
    assert layer.mask is not layer.mask and layer._mask_cache is None
    with pytest.raises(ValueError, match="shape"):
        layer.mask = torch.ones(3, 3, dtype=torch.bool)
    layer.mask = None
    assert layer.mask is None and not layer.is_sparse and layer.nnz() == 24 * 40
    state = {k for k in layer.state_dict()}
    assert "mask" not in state


_PEAK_CHILD = r"""
import json, sys, torch
from transformers import CLIPConfig, CLIPModel
from rcc_compression.compression.cascade import CascadePipeline
from rcc_compression.config import load_config
from rcc_compression.models.clip import CLIPWrapper
from rcc_compression.utils.memory import peak_resident_bytes, release_memory, resident_bytes
torch.manual_seed(0)
cfg = CLIPConfig(text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                                  vocab_size=1000),
                 vision_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                                    num_attention_heads=8, image_size=32, patch_size=16), projection_dim=256)
model = CLIPWrapper(CLIPModel(cfg).eval(), name="mid-clip")
release_memory()
loaded = resident_bytes()
model_bytes = sum(t.numel() * t.element_size() for t in [*model.model.parameters(), *model.model.buffers()])
linear = sum(m.weight.numel() * 4 for m in model.model.modules() if isinstance(m, torch.nn.Linear))
sets = ["compression.dare.fine_tune_epochs=0", "compression.alphaedit.num_epochs=0",
        "compression.cascade.validation_threshold=0.0", "compression.cascade.rounds=1",
        f"compression.cascade.offload={sys.argv[1]}"]
CascadePipeline(load_config(None, sets).compression, seed=0, num_synthetic_batches=3).compress(model)
print(json.dumps({"loaded": loaded, "peak": peak_resident_bytes(), "model": model_bytes, "linear": linear}))
"""


def _peak(mode: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _PEAK_CHILD, mode], check=True, capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.e2e
def test_offloaded_teacher_and_rollback_copies_are_not_resident():
    """The design's default cascade, one round, on a CLIP whose 50 M Linear weights dominate, each mode in
    a fresh process: with ``offload: disk`` the peak resident set is lower by at least 0.6x the Linear
    layers' bytes (the teacher's copy of them is 1x; the margin is for the allocator, whose retained
    per-layer temporaries vary by machine by up to ~80 MB: the 50 M Linear weights keep the teacher's
    copy well above that). The absolute
    target is the slow test below, on ViT-B/32's shapes: on a model this small the process's fixed
    costs (interpreter, libraries, activations) dominate any ratio to the model's bytes."""
    disk, memory = _peak("disk"), _peak("memory")
    assert memory["peak"] - disk["peak"] >= 0.6 * disk["linear"], (disk, memory)


@pytest.mark.slow
def test_vit_b32_cascade_peak_is_at_most_three_times_the_model():
    """Issue target on the ViT-B/32-shaped CLIP (151 M parameters): peak resident <= 3x the model's bytes."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "cascade_speed.py"), "--only", "memory", "--rounds", "1",
           "--offload", "disk"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    line = [x for x in out.stdout.splitlines() if x.startswith("[4]")][-1]
    ratio = float(line.split(" = ")[1].split("x")[0])
    assert ratio <= 3.0, line


def test_planner_second_moments_stream_in_bounded_groups(mlp, mlp_batches):
    from rcc_compression.compression.calibration import collect_layer_stats, iter_grams

    names = ["fc1", "fc2", "head"]
    whole = collect_layer_stats(mlp, names, mlp_batches, gram=True)
    calls = []
    mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    one_layer = 4 * 48 ** 2  # fc2's n x n moment, the largest
    grams = iter_grams(mlp, names, mlp_batches, max_bytes=one_layer)
    assert not calls  # nothing gathered before it is read
    got = list(grams)
    assert len(calls) == 3 * len(mlp_batches)  # fc1 + fc2 exceed the bound together: one group each
    for name, g in zip(names, got, strict=True):
        assert torch.equal(g, whole[name].gram)


def test_a_killed_run_leaves_no_offload_directory_behind(tmp_path):
    """A process killed with SIGKILL runs no clean-up: the next store in the same place removes its files."""
    child = ("import sys, os, signal, torch\n"
             "from rcc_compression.compression.offload import TensorStore\n"
             "s = TensorStore('disk', sys.argv[1]); h = s.put(torch.ones(1000))\n"
             "print(s.dir, flush=True); os.kill(os.getpid(), signal.SIGKILL)\n")
    out = subprocess.run([sys.executable, "-c", child, str(tmp_path)], capture_output=True, text=True, timeout=120)
    orphan = Path(out.stdout.strip())
    assert orphan.parent == tmp_path and orphan.is_dir() and any(orphan.iterdir())
    mine = TensorStore("disk", tmp_path)  # a live process's directory is kept
    assert not orphan.exists() and mine.dir.exists()
    assert remove_orphans(tmp_path) == []
