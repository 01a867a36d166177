"""ONNX export keeps the compression: compact tensors on disk, ONNX Runtime within 1e-4 of PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from .conftest import compress_quick

onnx = pytest.importorskip("onnx", reason="the export extra (onnx, onnxruntime) is not installed")
pytest.importorskip("onnxruntime", reason="the export extra (onnx, onnxruntime) is not installed")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """tiny-clip with bitmask, CSR and dense S layers, low rank everywhere, scales on half; exported."""
    from rcc_compression.compression.layers import compressed_layers
    from rcc_compression.compression.onnx_export import export_onnx
    from rcc_compression.compression.storage import choose_encoding, save_compressed
    from rcc_compression.models import get_model

    torch.manual_seed(0)
    wrapper = compress_quick(get_model("tiny-clip"), rank=4, densities=(0.2, 0.03, None, 0.03), scales=True)
    encodings = {choose_encoding(m) for m in compressed_layers(wrapper.model).values()}
    assert encodings == {"bitmask", "csr", "dense"}
    root = tmp_path_factory.mktemp("onnx")
    manifest = save_compressed(wrapper, root / "ckpt")
    out = root / "onnx"
    return {"wrapper": wrapper, "manifest": manifest, "onnx": export_onnx(wrapper, out), "dir": out, "root": root}


def test_onnx_runtime_matches_pytorch_on_new_shapes(exported):
    from rcc_compression.compression.onnx_export import run_onnx

    w, d = exported["wrapper"], exported["dir"]
    assert all(g["max_abs_diff"] < 1e-4 for g in exported["onnx"]["graphs"].values())
    g = torch.Generator().manual_seed(5)
    pixels = torch.randn(5, 3, w.image_size, w.image_size, generator=g)  # another batch size than exported with
    ids = w.tokenize(["a red circle", "two blue squares on the left of a big star", "a"])
    with torch.no_grad():
        img = w.encode_image(pixels, normalize=False).numpy()
        txt = w.encode_text(ids["input_ids"], ids["attention_mask"], normalize=False).numpy()
    got_img = run_onnx(d / "vision_model.onnx", {"pixel_values": pixels.numpy()})
    got_txt = run_onnx(d / "text_model.onnx", {k: v.numpy() for k, v in ids.items()})
    assert np.abs(got_img - img).max() < 1e-4 and np.abs(got_txt - txt).max() < 1e-4


def onnx_layer_bytes(directory, layers) -> dict[str, int]:
    from onnx import numpy_helper

    per_layer: dict[str, int] = {}
    for f in ("vision_model.onnx", "text_model.onnx"):
        for init in onnx.load(str(directory / f)).graph.initializer:
            name, _, part = init.name.rpartition(".")
            if name in layers and (part in ("dense", "weight_T", "values", "mask_bits", "col_idx", "row_nnz", "A_T",
                                            "B_T", "a_in", "a_out", "bias")
                                   or part.endswith(("_codes", "_scale", "_nbits", "_nscale", "_nzero"))):
                per_layer[name] = per_layer.get(name, 0) + numpy_helper.to_array(init).nbytes
    return per_layer


def test_compressed_layers_are_stored_as_compactly_as_the_checkpoint(exported):
    """Per layer, the ONNX initializers hold exactly the checkpoint's bytes (no dense copy of S)."""
    layers = exported["manifest"]["layers"]
    assert onnx_layer_bytes(exported["dir"], layers) == {n: info["stored_bytes"] for n, info in layers.items()}


@pytest.mark.e2e
@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, False), (3, None, True), (8, None, True)])
@pytest.mark.parametrize("weight_only", ["dequantize", "matmulnbits"])
def test_quantized_layers_keep_their_bit_width(tmp_path, bits, group, symmetric, weight_only):
    """Integer codes go in packed as stored, decoded by DequantizeLinear or multiplied by MatMulNBits (dense
    4-bit codes, whose float16 scales it takes as float32): the same code bytes, the same outputs."""
    from onnx import numpy_helper

    from rcc_compression.compression.layers import compressed_layers
    from rcc_compression.compression.onnx_export import export_onnx
    from rcc_compression.compression.quant import quantize_nearest
    from rcc_compression.compression.storage import save_compressed
    from rcc_compression.models import get_model

    torch.manual_seed(0)
    w = compress_quick(get_model("tiny-clip"), rank=4, densities=(0.2, 0.03, None, 0.03), scales=True)
    for layer in compressed_layers(w.model).values():
        layer.set_quantized("weight", quantize_nearest(layer.weight.detach(), bits, group, symmetric, layer.mask))
        layer.set_quantized("lr_A", quantize_nearest(layer.lr_A.detach(), bits, group, symmetric))
        layer.set_quantized("lr_B", quantize_nearest(layer.lr_B.detach(), 8))
    manifest = save_compressed(w, tmp_path / "ckpt")
    report = export_onnx(w, tmp_path / "onnx", weight_only=weight_only)
    assert all(g["max_abs_diff"] < 1e-4 for g in report["graphs"].values())
    layers = manifest["layers"]
    nbits = weight_only == "matmulnbits" and bits == 4
    # MatMulNBits takes float32 scales (2 bytes more per scale than stored) and pads each row's packed
    # 4-bit zero points to whole bytes
    widened: dict[str, int] = {}
    if nbits:
        for f in ("vision_model.onnx", "text_model.onnx"):
            inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "onnx" / f)).graph.initializer}
            for key, arr in inits.items():
                name, _, part = key.rpartition(".")
                if part == "dense_nscale":
                    widened[name] = arr.size * 2
                    if f"{name}.dense_nzero" in inits:
                        widened[name] += inits[f"{name}.dense_nzero"].size - (arr.size * bits + 7) // 8
    counted = onnx_layer_bytes(tmp_path / "onnx", layers)
    assert counted == {n: info["stored_bytes"] + widened.get(n, 0) for n, info in layers.items()}
    ops = {n.op_type for n in onnx.load(str(tmp_path / "onnx" / "vision_model.onnx")).graph.node}
    assert "DequantizeLinear" in ops  # sparse S and factors are decoded
    assert ("MatMulNBits" in ops) == nbits


def test_onnx_runtime_folds_the_sparse_rebuild_at_load(exported, tmp_path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(exported["dir"] / "vision_model.onnx"), opts, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert not ops & {"ScatterElements", "BitwiseAnd", "CumSum", "Max"}, ops
    src_ops = {n.op_type for n in onnx.load(str(exported["dir"] / "vision_model.onnx")).graph.node}
    assert {"ScatterElements", "BitwiseAnd", "CumSum", "Max"} <= src_ops


def test_rcc_export_cli_onnx_and_hf_from_an_encrypted_checkpoint(exported, monkeypatch, capsys):
    from transformers import CLIPModel

    from rcc_compression.cli import main
    from rcc_compression.compression.storage import save_compressed
    from rcc_compression.utils.crypto import KEY_ENV, generate_key

    key = generate_key()
    ckpt = exported["root"] / "enc"
    save_compressed(exported["wrapper"], ckpt, encrypt_key=key)
    monkeypatch.setenv(KEY_ENV, key.hex())
    assert main(["export", str(ckpt), "--format", "onnx", "-o", str(exported["root"] / "o1"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "max |ONNX Runtime - PyTorch|" in out and "checkpoint's tensors" in out
    man = json.loads((exported["root"] / "o1" / "onnx_manifest.json").read_text())
    assert man["logit_scale"] == pytest.approx(float(exported["wrapper"].logit_scale.detach()))
    assert main(["export", str(ckpt), "--format", "hf", "-o", str(exported["root"] / "o2"), "-q"]) == 0
    dense = CLIPModel.from_pretrained(exported["root"] / "o2").eval()
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = exported["wrapper"].encode_image(px, normalize=False)
        got = dense.visual_projection(dense.vision_model(pixel_values=px).pooler_output)
    assert torch.allclose(got, ref, atol=1e-5)
    monkeypatch.delenv(KEY_ENV)
    assert main(["export", str(ckpt), "-o", str(exported["root"] / "o3")]) == 2  # no key: one-line error


def test_compressed_blip_captions_the_same_in_onnx_runtime(tmp_path):
    """The bundled BLIP compressed, exported (vision + decoder), decoded greedily by ONNX Runtime alone."""
    from rcc_compression.compression.onnx_export import export_onnx, onnx_greedy_caption
    from rcc_compression.models import get_model

    torch.manual_seed(0)
    w = compress_quick(get_model("rcc-blip-world"), rank=16, densities=(0.3, None))
    report = export_onnx(w, tmp_path / "blip")
    assert set(report["graphs"]) == {"vision_model.onnx", "text_decoder.onnx"}
    assert all(g["max_abs_diff"] < 1e-4 for g in report["graphs"].values())
    pixels = torch.randn(3, 3, w.image_size, w.image_size, generator=torch.Generator().manual_seed(3))
    ids = onnx_greedy_caption(tmp_path / "blip", pixels.numpy(), max_length=20)
    assert [s.strip() for s in w.decode(torch.from_numpy(ids))] == w.generate_caption(pixels, max_length=20)


def test_blip_vqa_onnx_is_refused_plainly(tmp_path):
    from rcc_compression.compression.onnx_export import export_onnx
    from rcc_compression.errors import CheckpointError
    from rcc_compression.models import get_model

    with pytest.raises(CheckpointError, match="--format hf"):
        export_onnx(get_model("tiny-blip-vqa"), tmp_path / "x")


@pytest.mark.parametrize("sparse", [True, False])
def test_one_layer_subgraph_with_padded_groups_matches_the_layer(sparse):
    """40 input columns in groups of 32 (a padded last group), 2-bit asymmetric S, 8-bit factors, scales, bias."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from rcc_compression.compression.layers import CompressedLinear
    from rcc_compression.compression.onnx_export import OPSET, layer_subgraph
    from rcc_compression.compression.quant import quantize_nearest

    torch.manual_seed(0)
    layer = CompressedLinear.from_linear(torch.nn.Linear(40, 24))
    w = layer.weight.detach()
    mask = torch.rand_like(w) < 0.3 if sparse else None
    layer.set_sparse(w, mask)
    layer.set_low_rank(torch.randn(24, 3), torch.randn(3, 40))
    layer.set_scales(torch.rand(40) + 0.5, torch.rand(24) + 0.5)
    layer.set_quantized("weight", quantize_nearest(layer.weight.detach(), 2, 32, False, layer.mask))
    layer.set_quantized("lr_A", quantize_nearest(layer.lr_A.detach(), 8, 32))
    layer.eval()
    nodes, inits = layer_subgraph("layer", layer, "x", "y")
    graph = helper.make_graph(nodes, "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 40])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 24])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 40)
    with torch.no_grad():
        ref = layer(x).numpy()
    assert np.abs(sess.run(None, {"x": x.numpy()})[0] - ref).max() < 1e-4


def _int8_activation_clip(group: int | None = None):
    """tiny-clip with 8-bit per-row codes (or grouped 4-bit ones) and int8 activations on every target layer."""
    from rcc_compression.compression.layers import CompressedLinear, replace_module
    from rcc_compression.compression.quant import quantize_nearest
    from rcc_compression.models import get_model

    torch.manual_seed(0)
    w = get_model("tiny-clip")
    for i, name in enumerate([n for n, m in w.model.named_modules() if isinstance(m, torch.nn.Linear)]):
        layer = CompressedLinear.from_linear(w.model.get_submodule(name))
        if i % 3 == 1:
            layer.set_low_rank(torch.randn(layer.out_features, 2) * 0.1, torch.randn(2, layer.in_features) * 0.1)
            layer.set_quantized("lr_A", quantize_nearest(layer.lr_A.detach(), 8))
        bits, g = (8, None) if group is None else (4, group)
        layer.set_quantized("weight", quantize_nearest(layer.weight.detach(), bits, g, g is None))
        layer.set_activations(8)
        replace_module(w.model, name, layer)
    return w.eval()


@pytest.mark.parametrize("group", [None, 16])
def test_int8_activation_layers_export_as_integer_matmuls_and_match_pytorch(tmp_path, group):
    """W8A8 layers: per-token DynamicQuantize built from ReduceMax/Round/Cast, MatMulInteger, both scales; layers
    whose codes have no integer GEMM round their input the same way and multiply in float."""
    from rcc_compression.compression.onnx_export import export_onnx, run_onnx

    w = _int8_activation_clip(group)
    report = export_onnx(w, tmp_path / "onnx")
    assert all(g["relative_error"] < 1e-2 for g in report["graphs"].values())
    ops = [n.op_type for n in onnx.load(str(tmp_path / "onnx" / "vision_model.onnx")).graph.node]
    assert ("MatMulInteger" in ops) == (group is None)
    assert "Round" in ops
    pixels = torch.randn(3, 3, w.image_size, w.image_size, generator=torch.Generator().manual_seed(2))
    for layer_mode in ("factored", "w8a8"):  # the integer kernel and the float path agree with ONNX Runtime
        from rcc_compression.compression.layers import compressed_layers

        for m in compressed_layers(w.model).values():
            m.set_execution(layer_mode)
        with torch.no_grad():
            ref = w.encode_image(pixels, normalize=False).numpy()
        got = run_onnx(tmp_path / "onnx" / "vision_model.onnx", {"pixel_values": pixels.numpy()})
        # one int8 code may flip where ONNX Runtime's float ops round differently: most outputs are exact
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-2
        assert np.mean(np.abs(got - ref) < 1e-4) > 0.5


def test_layers_with_nothing_to_multiply_and_bfloat16_models_export(tmp_path):
    """Issue 22 item 5: a bias-only layer (a global budget makes them), an all-pruned S and a bfloat16 model
    raised "nothing to export" or "unsupported ScalarType BFloat16"."""
    from rcc_compression.compression.layers import CompressedLinear, compressed_layers, replace_module
    from rcc_compression.compression.onnx_export import export_onnx
    from rcc_compression.models import get_model

    torch.manual_seed(0)
    w = compress_quick(get_model("tiny-clip"), rank=4, densities=(0.2, None))
    names = list(compressed_layers(w.model))
    bias_only = CompressedLinear.from_linear(w.model.get_submodule(names[0]).merge())
    bias_only.set_sparse(None)
    replace_module(w.model, names[0], bias_only)
    pruned = w.model.get_submodule(names[1])
    pruned.set_low_rank(None, None)
    pruned.set_sparse(pruned.weight.detach(), torch.zeros(pruned.weight.shape, dtype=torch.bool))
    assert pruned.nnz() == 0
    report = export_onnx(w, tmp_path / "f32")
    assert all(g["max_abs_diff"] < 1e-4 for g in report["graphs"].values())
    w.to(torch.bfloat16)
    report = export_onnx(w, tmp_path / "bf16")
    assert report["model_dtype"] == "bfloat16" and report["graph_dtype"] == "float32"
    assert all(g["max_abs_diff"] < 1e-4 for g in report["graphs"].values())
    assert next(w.model.parameters()).dtype == torch.bfloat16  # the model itself is left as it was
