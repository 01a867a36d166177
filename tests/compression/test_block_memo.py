"""BlockMemo: blocks whose modules and inputs are unchanged return what they returned, and nothing else does."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from rcc_compression import compress_model
from rcc_compression.compression import blocks as blocks_mod
from rcc_compression.compression.blocks import BlockMemo, find_stacks
from rcc_compression.compression.calibration import collect_layer_stats, run_outputs
from rcc_compression.data.calibration import build_calibration_batches


def _bert() -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=40)
    return BertModel(cfg, add_pooling_layer=False).eval()


def _batches(n: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 120, (3, 11), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 7:] = 0  # a padded caption
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _memo(model: nn.Module) -> BlockMemo:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return BlockMemo(model, find_stacks(model, names), slots=2)


def _same(a, b) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_unchanged_blocks_replay_and_a_changed_one_runs():
    model, batches = _bert(), _batches()
    reference = run_outputs(model, batches)
    memo = _memo(model)
    with memo.active():
        first = run_outputs(model, batches)
        assert (memo.hits, memo.runs) == (0, 8)
        again = run_outputs(model, batches)
        assert (memo.hits, memo.runs) == (8, 8)  # every block of both batches replayed
    for a, b, c in zip(reference, first, again, strict=True):
        _same(a, b)
        _same(a, c)
    # a new weight in block 2: blocks 0-1 replay, blocks 2-3 run, the outputs are those of a plain run
    layer = model.encoder.layer[2].intermediate.dense
    layer.weight = nn.Parameter(layer.weight.detach() * 1.1, requires_grad=False)
    plain = run_outputs(model, batches)
    with memo.active():
        changed = run_outputs(model, batches)
    assert (memo.hits, memo.runs) == (8 + 4, 8 + 4)
    for a, b in zip(plain, changed, strict=True):
        _same(a, b)
    assert not torch.equal(plain[0]["last_hidden_state"], reference[0]["last_hidden_state"])
    assert "forward" not in model.encoder.layer[0].__dict__  # the blocks' own forward is back


def test_in_place_changes_hooks_and_autograd_run_the_block():
    model, batches = _bert(), _batches(1)
    memo = _memo(model)
    with memo.active():
        run_outputs(model, batches)
        with torch.no_grad():
            model.encoder.layer[0].attention.self.query.weight.mul_(0.5)  # same tensor, new version
        plain_runs = memo.runs
        out = run_outputs(model, batches)
        assert memo.runs == plain_runs + 4  # block 0 changed: every block after it sees new inputs
        # statistics read inside block 3: that block runs for real, its hook sees the inputs
        stats = collect_layer_stats(model, ["encoder.layer.3.output.dense"], batches, gram=True)
        with torch.enable_grad():
            hits = memo.hits
            model(**batches[0])
            assert memo.hits == hits
    expected = collect_layer_stats(model, ["encoder.layer.3.output.dense"], batches, gram=True)
    assert torch.equal(stats["encoder.layer.3.output.dense"].gram, expected["encoder.layer.3.output.dense"].gram)
    _same(out[0], run_outputs(model, batches)[0])


def test_each_block_keeps_its_latest_slots():
    model, batches = _bert(), _batches(2)
    memo = _memo(model)
    memo.slots = 1
    with memo.active():
        run_outputs(model, batches)  # batch 1 replaces batch 0 in every block
        run_outputs(model, batches[1:])
        assert memo.hits == 4
        run_outputs(model, batches[:1])
        assert memo.hits == 4
    assert all(len(v) == 1 for v in memo.entries.values())


def test_byte_cap_keeps_the_earliest_blocks():
    model, batches = _bert(), _batches(1)
    memo = _memo(model)
    memo.max_bytes = 2 * 3 * 11 * 32 * 4  # two blocks' outputs
    with memo.active():
        run_outputs(model, batches)
        assert memo.held <= memo.max_bytes
        run_outputs(model, batches)
    assert memo.hits == 2
    memo.clear()
    assert memo.held == 0 and not memo.entries


@pytest.mark.e2e
def test_the_planner_makes_the_same_plan_with_and_without_the_memo(tiny_clip, monkeypatch):
    batches = build_calibration_batches(tiny_clip, "world", 8, 8, 0)
    cfg = {"compression": {"towers": {"probe": "measured"}}, "experiment": {"seed": 0}}
    with_memo = compress_model(copy.deepcopy(tiny_clip), 0.8, "cascade", calibration_data=batches, config=cfg,
                               progress=False).compression_stats
    monkeypatch.setattr(blocks_mod.BlockMemo, "active", lambda self: contextlib.nullcontext(self))
    without = compress_model(copy.deepcopy(tiny_clip), 0.8, "cascade", calibration_data=batches, config=cfg,
                             progress=False).compression_stats
    assert with_memo["plan"]["towers"]["sensitivity"]["layers"]  # measured, a pass per layer
    assert with_memo["plan"]["layers"] == without["plan"]["layers"]
    assert with_memo["plan"]["towers"]["sensitivity"] == without["plan"]["towers"]["sensitivity"]
    assert with_memo["achieved_rate"] == without["achieved_rate"]
