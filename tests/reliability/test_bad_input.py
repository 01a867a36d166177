"""The bad-input matrix of docs/reliability.md, one test per row: what the user sees for each bad
config, model, data set and run-time fault (exit status and the exact message). The rows for
checkpoints, a full disk and CUDA out of memory are in test_checkpoints.py and test_out_of_memory.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from reliability_helpers import assert_same_state, fresh_mlp, make_batches, mlp_section, model_state
from safetensors.torch import load_file
from torch import nn

from rcc_compression.cli import main
from rcc_compression.compression.cascade import CascadePipeline
from rcc_compression.compression.layers import compressed_layers
from rcc_compression.compression.nullu import NulluStage
from rcc_compression.errors import CompressionError, DataError

FAST = ["--model", "tiny-clip", "--set", "calibration.num_batches=2", "--set", "calibration.batch_size=4",
        "--set", "calibration.holdout_batches=1", "--set", "compression.dare.iterations=1",
        "--set", "compression.dare.fine_tune_epochs=0", "--set", "compression.alphaedit.num_epochs=1",
        "--set", "compression.cascade.validation_threshold=0.0", "--set", "evaluation.benchmarks=[]", "--no-eval", "-q"]


def _error_line(capsys) -> str:
    """The CLI's one error line (other stderr lines are third-party warnings, e.g. transformers')."""
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


# --------------------------------------------------------------------------- config
CONFIG_ROWS = {
    "unknown key": ("compression:\n  dare:\n    pruning_ratez: 0.3\n",
                    "compression.dare.pruning_ratez: unknown key 'pruning_ratez'; allowed keys: targets, ignore, "
                    "pruning_rate, iterations, pruning_schedule, fine_tune_epochs, fine_tune_lr, scorer, target, "
                    "reference_model, rescale, scope, nm, layer_rates"),
    "wrong type": ("calibration:\n  num_batches: many\n",
                   "calibration.num_batches: expected an integer (int), got 'many'"),
    "rate 1.5": ("compression:\n  dare:\n    pruning_rate: 1.5\n",
                 "compression.dare.pruning_rate: Input should be less than 1; got 1.5"),
    "rate -0.1": ("compression:\n  dare:\n    pruning_rate: -0.1\n",
                  "compression.dare.pruning_rate: Input should be greater than or equal to 0; got -0.1"),
    "unknown stage": ("compression:\n  cascade:\n    stages: [dare, quantize]\n",
                      "compression.cascade.stages: unknown stage 'quantize'; allowed: dare, nullu, alphaedit, quant; "
                      "got ['dare', 'quantize']"),
    "no loss to train": ("training:\n  kd_weight: 0\n  feature_weight: 0\n",
                         "training: every loss weight (kd_weight, feature_weight, attention_weight, task_weight) is "
                         "0: at least one must be > 0; got {'feature_weight': 0, 'kd_weight': 0}"),
    "empty file": ("", "file is empty, expected a mapping of sections"),
    "YAML syntax error": ("compression:\n  dare: {pruning_rate: 0.5\n",
                          "line 3, column 1: YAML syntax error: expected ',' or '}', but got '<stream end>'"),
    "not a mapping": ("- dare\n- nullu\n", "top level must be a mapping, got list"),
}


@pytest.mark.parametrize("row", CONFIG_ROWS)
def test_config_rows(tmp_path, capsys, row):
    text, expected = CONFIG_ROWS[row]
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(text)
    assert main(["compress", "--config", str(cfg), "--output", str(tmp_path / "run")]) == 2
    assert _error_line(capsys) == f"error: config error: {cfg}: {expected}"
    assert not (tmp_path / "run").exists()


def test_config_rate_via_set(capsys):
    assert main(["config", "--set", "compression.nullu.param_budget=1.5"]) == 2
    assert _error_line(capsys) == ("error: config error: --set: compression.nullu.param_budget: Input should be less "
                                   "than or equal to 1; got 1.5")


def test_config_cyclic_inherit(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("inherit: b.yaml\n")
    (tmp_path / "b.yaml").write_text("inherit: a.yaml\n")
    assert main(["compress", "--config", str(tmp_path / "a.yaml")]) == 2
    assert _error_line(capsys) == (f"error: config error: {tmp_path / 'b.yaml'}: inherit: cycle a.yaml -> b.yaml -> "
                                   "a.yaml; remove one of these inherits")


def test_config_missing_file(tmp_path, capsys):
    assert main(["compress", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert _error_line(capsys) == f"error: config error: {tmp_path / 'nope.yaml'}: file not found"
    (tmp_path / "c.yaml").write_text("inherit: base/missing.yaml\n")
    assert main(["compress", "--config", str(tmp_path / "c.yaml")]) == 2
    assert _error_line(capsys) == (f"error: config error: {tmp_path / 'base' / 'missing.yaml'}: file not found "
                                   f"(inherited from {tmp_path / 'c.yaml'}: inherit)")


# --------------------------------------------------------------------------- model
def test_model_unreachable_hub_id(tmp_path, capsys):
    assert main(["compress", *FAST, "--model", "no-such-org/no-such-model", "--output", str(tmp_path / "r")]) == 2
    assert _error_line(capsys) == (
        "error: cannot load 'no-such-org/no-such-model': it is not a bundled name (rcc-blip-world, rcc-clip-world, "
        "rcc-llava-world), not a tiny test model (tiny-clip, tiny-siglip, tiny-blip, tiny-blip-vqa, tiny-llava), not a "
        "local directory, and the Hugging Face hub could not be reached "
        "(this machine may have no network). Download it where there is network (huggingface-cli download "
        "no-such-org/no-such-model --local-dir DIR) and pass the local directory instead. [OSError]")


def test_model_missing_directory(tmp_path, capsys):
    assert main(["compress", *FAST, "--model", "./no-such-dir", "--output", str(tmp_path / "r")]) == 2
    assert _error_line(capsys) == "error: ./no-such-dir: no such model directory"


def test_model_type_that_does_not_match_the_model(tmp_path, capsys):
    assert main(["compress", *FAST, "--set", "model.type=blip", "--output", str(tmp_path / "r")]) == 2
    assert _error_line(capsys) == "error: tiny-clip is a clip model, not blip"


def test_model_of_the_wrong_type_for_a_benchmark(tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["evaluate", "--model", "tiny-clip", "--benchmark", "captioning", "--output", str(out), "-q"]) == 2
    assert _error_line(capsys) == ("error: no benchmark ran (captioning on *: captioning needs a captioning model "
                                   f"(BLIP captioning, LLaVA); this is clip); see {out / 'results.md'}")
    results = json.loads((out / "results.json").read_text())
    assert results["results"] == {}
    reason = "captioning needs a captioning model (BLIP captioning, LLaVA); this is clip"
    assert results["skipped"] == [{"benchmark": "captioning", "dataset": "*", "reason": reason}]
    assert f"- captioning on *: {reason}" in (out / "results.md").read_text()


class ConvOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_model_without_linear_layers():
    from rcc_compression import compress_model
    from rcc_compression.config import load_config

    batches = [{"x": torch.randn(2, 3, 8, 8)}]
    with pytest.raises(CompressionError) as err:
        CascadePipeline(load_config(None).compression, calibration_data=batches).compress(ConvOnly())
    assert str(err.value) == "stage 'dare': no Linear layer of ConvOnly matches targets default (ignore default)"
    with pytest.raises(CompressionError) as err:
        compress_model(ConvOnly(), compression_rate=0.5, calibration_data=batches)
    assert str(err.value) == "no Linear layer matches the stages' targets"


# --------------------------------------------------------------------------- data
def _captions_dir(root: Path, captions: list[str] | None = None, corrupt: int | None = None,
                  document: object = None) -> Path:
    """A COCO-style Karpathy captions dataset of four 16x16 images (``images/i.png``)."""
    (root / "images").mkdir(parents=True)
    entries = []
    for i in range(4):
        f = root / "images" / f"{i}.png"
        if i == corrupt:
            f.write_bytes(b"this is not an image")
        else:
            Image.new("RGB", (16, 16), (60 * i, 20, 200)).save(f)
        entries.append({"filepath": "images", "filename": f"{i}.png", "split": "train",
                        "sentences": [{"raw": captions[i] if captions else f"a blue square number {i}"}]})
    (root / "dataset_coco.json").write_text(json.dumps(document if document is not None
                                                       else {"dataset": "coco", "images": entries}))
    return root


def test_data_missing_folder(tmp_path, capsys):
    src = tmp_path / "no-such-data"
    assert main(["compress", *FAST, "--set", f"calibration.source={src}", "--output", str(tmp_path / "r")]) == 2
    assert _error_line(capsys) == f"error: {src}: no such file or directory"


@pytest.mark.e2e
def test_data_corrupt_image(tmp_path, capsys):
    src = _captions_dir(tmp_path / "data", corrupt=2)
    assert main(["compress", *FAST, "--set", f"calibration.source={src}", "--output", str(tmp_path / "r")]) == 2
    assert _error_line(capsys) == (
        f"error: {src / 'images' / '2.png'}: not a readable image (allowed: PNG, JPEG, WEBP, BMP, GIF, TIFF, PPM); "
        "pass skip_bad=True / --skip-bad to skip unreadable images")
    # dataset.skip_bad: the unreadable image is left out and the run completes
    run = tmp_path / "r2"
    assert main(["compress", *FAST, "--set", f"calibration.source={src}", "--set", "dataset.skip_bad=true",
                 "--output", str(run)]) == 0
    assert json.loads((run / "run.json").read_text())["status"] == "ok"
    # the batches come out smaller by the draws of the unreadable image
    from rcc_compression.data.calibration import build_calibration_batches
    from rcc_compression.models import get_model

    batches = build_calibration_batches(get_model("tiny-clip"), str(src), 4, 4, 0, skip_bad=True)
    draws = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(0))
    assert int((draws == 2).sum()) > 0
    assert sum(b["pixel_values"].shape[0] for b in batches) == 16 - int((draws == 2).sum())


def test_data_empty_caption(tmp_path, capsys):
    src = _captions_dir(tmp_path / "data", captions=["a red circle", "  ", "a cat", "a dog"])
    assert main(["compress", *FAST, "--set", f"calibration.source={src}", "--output", str(tmp_path / "r")]) == 2
    assert _error_line(capsys) == (f"error: {src / 'dataset_coco.json'}: images[1] (1.png): sentence 0 is an empty "
                                   "caption (pass skip_bad=True / --skip-bad to skip such items)")


@pytest.mark.parametrize("document,expected", [
    ({"imgs": []}, "json is neither Karpathy captions ('images') nor VQA questions ('questions')"),
    ({"images": [{"file": "0.png"}]}, "images[0]: expected an object with 'filename' and a 'sentences' list"),
    ({"images": [{"filename": "0.png", "split": "train", "sentences": [{"text": "x"}]}]},
     "images[0].sentences[0]: expected 'raw' text or a 'tokens' list"),
])
def test_data_wrong_json_schema(tmp_path, capsys, document, expected):
    src = _captions_dir(tmp_path / "data", document=document)
    assert main(["compress", *FAST, "--set", f"calibration.source={src}", "--output", str(tmp_path / "r")]) == 2
    assert _error_line(capsys) == f"error: {src / 'dataset_coco.json'}: {expected}"


def test_data_malformed_json(tmp_path, capsys):
    src = _captions_dir(tmp_path / "data")
    (src / "dataset_coco.json").write_text('{"images": [')
    with pytest.raises(DataError) as err:
        from rcc_compression.data.datasets import open_dataset

        open_dataset(src, split="train")
    assert str(err.value) == (f"{src / 'dataset_coco.json'}: malformed JSON at line 1, column 13: "
                              "Expecting value")


# --------------------------------------------------------------------------- run time: non-finite results
def _poison(monkeypatch, kind: str, on_call: int) -> None:
    """After the ``on_call``-th nullu step: a NaN or Inf weight, or finite weights whose outputs overflow."""
    real, calls = NulluStage.compress, []

    def compress(self, model, ctx):  # noqa: ANN001, ANN202
        out = real(self, model, ctx)
        calls.append(1)
        if len(calls) == on_call:
            layer = next(iter(compressed_layers(model).values()))
            with torch.no_grad():
                if kind == "overflow":  # a row of 3e38 (finite): its dot products leave float32's range
                    for layer in compressed_layers(model).values():
                        layer.weight[0, :] = 3e38
                else:
                    layer.weight.view(-1)[0] = {"nan": math.nan, "inf": math.inf}[kind]
        return out

    monkeypatch.setattr(NulluStage, "compress", compress)


@pytest.mark.parametrize("kind", ["nan", "inf", "overflow"])
def test_non_finite_stage_is_rolled_back(monkeypatch, kind):
    after: dict[int, dict[str, torch.Tensor]] = {}
    reference = fresh_mlp()
    CascadePipeline(mlp_section(rounds=2), calibration_data=make_batches(), seed=1,
                    step_callback=lambda r: after.setdefault(r["step"], model_state(reference))).compress(reference)
    _poison(monkeypatch, kind, on_call=2)  # nullu of round 2 (step 3) goes bad
    model = fresh_mlp()
    pipe = CascadePipeline(mlp_section(rounds=2), calibration_data=make_batches(), seed=1)
    pipe.compress(model)
    last = pipe.records[-1]
    assert [r["step"] for r in pipe.records] == [0, 1, 2, 3]
    assert last["stage"] == "nullu" and last["passed"] is False and last["rolled_back"] is True
    assert last["error"] == "non-finite weights or outputs" and pipe.stopped_early
    if kind == "overflow":  # the weights were finite; the outputs were not
        assert math.isnan(last["metric"])
    # back to the smallest passing state (issue 10, item 2): the passing step that stored the fewest bytes
    smallest = min(range(3), key=lambda i: (pipe.records[i]["achieved"]["stored_bytes"], -i))
    assert last["rolled_back_to_step"] == smallest
    assert_same_state(model_state(model), after[smallest])


@pytest.mark.e2e
def test_non_finite_stage_in_the_cli_says_so(tmp_path, monkeypatch, capsys):
    plain = tmp_path / "dare-only"
    assert main(["compress", *FAST, "--set", "compression.cascade.stages=[dare]", "--output", str(plain)]) == 0
    _poison(monkeypatch, "nan", on_call=1)
    run = tmp_path / "run"
    assert main(["compress", *FAST, "--set", "compression.cascade.stages=[dare,nullu]", "--output", str(run)]) == 0
    warning = ("step 1 (nullu, round 1) failed the gate (non-finite weights or outputs); went back to the smallest "
               "passing state (step 0) and stopped")
    assert warning in (run / "run.log").read_text()
    assert ("Stopped at step 1 of 2 (nullu, round 1): non-finite weights or outputs; kept step 0, the smallest "
            "passing state.") in (run / "results.md").read_text().splitlines()[2]
    results = json.loads((run / "results.json").read_text())
    assert results["stopped_early"] is True and results["records"][-1]["rolled_back"] is True
    got = {k: v for f in ("layers", "rest") for k, v in load_file(run / "compressed" / f"{f}.safetensors").items()}
    want = {k: v for f in ("layers", "rest") for k, v in load_file(plain / "compressed" / f"{f}.safetensors").items()}
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
