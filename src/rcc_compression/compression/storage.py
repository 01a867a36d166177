"""The compact saved format, and export to a plain Hugging Face model.

A compressed checkpoint is a directory holding

- ``layers.safetensors``: per compressed layer only what its compressed form needs: the kept
  values of S with a bit-packed mask or CSR column indices (whichever is smaller), the low-rank
  factors, the scales, the bias; a quantized part (``quant``) as bit-packed integer codes (only
  the kept entries of a sparse S) with its float16 scales and packed zero points;
- ``rest.safetensors``: every other parameter and buffer of the model;
- tokenizer / image-processor files, when the model came with them;
- ``manifest.json`` (written last): format version, model class and config, resolved config,
  per-layer structure, stage records, and the sha256 and size of every file;
- in a checkpoint written a block at a time (format version 4, :mod:`.shards`), also one tensor
  file per transformer block (``shards`` in the manifest), holding that block's compressed layers
  and its other tensors; ``layers.safetensors``/``rest.safetensors`` hold what lies outside the blocks.

A save is built in a staging directory next to the target and renamed into place whole, so the
target holds either the previous checkpoint or the complete new one, never a mix; a failed write
(a full disk) leaves it as it was. Loading verifies every size and hash before reading a tensor and
never unpickles. With a key, both tensor files are AES-256-GCM encrypted (``utils.crypto``) and
written with mode 0600; the manifest stays readable and records the key's public id.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..models.base import ModelWrapper
from ..models.registry import _load_processors, unwrap_model, wrap_model
from ..utils.crypto import MAGIC, decrypt_bytes, encrypt_bytes, key_id
from ..utils.io import (
    atomic_dir,
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_json,
    sha256_bytes,
    sha256_file,
    split_aliases,
)
from ..utils.logging import get_logger
from ..utils.memory import release_memory
from ..utils.schema import short
from .layers import (
    ACT_BITS,
    CompressedLinear,
    QuantizedPart,
    code_bytes,
    compressed_layers,
    count_bits,
    merge_all,
    pack_bits,
    pack_codes,
    replace_module,
    to_working,
    unpack_codes,
)
from .quant import BITS, part_bytes
from .records import step_records

log = get_logger("storage")

FORMAT = "rcc-compressed"
FORMAT_VERSION = 3
#: the version of a checkpoint written a block at a time (``shards``: one tensor file per block)
SHARDED_VERSION = 4
#: versions this code reads (1: no quantized parts; 2: no quantized activations; 4: sharded)
READABLE_VERSIONS = (1, 2, 3, 4)
#: the stored name of each quantizable part
_QPREFIX = {"lr_A": "A", "lr_B": "B"}
MANIFEST = "manifest.json"
LAYERS_FILE = "layers.safetensors"
REST_FILE = "rest.safetensors"
#: the folder of the block shards of a checkpoint written a block at a time
SHARD_DIR = "blocks"

#: model classes load_compressed may instantiate from a manifest (nothing else is ever constructed)
MODEL_CLASSES = {
    "CLIPModel": ("CLIPModel", "CLIPConfig"),
    "BlipForConditionalGeneration": ("BlipForConditionalGeneration", "BlipConfig"),
    "BlipForQuestionAnswering": ("BlipForQuestionAnswering", "BlipConfig"),
    "SiglipModel": ("SiglipModel", "SiglipConfig"),
    "LlavaForConditionalGeneration": ("LlavaForConditionalGeneration", "LlavaConfig"),
}

# ------------------------------------------------------------------------------ encodings
def _index_dtype(n: int) -> torch.dtype:
    return torch.int16 if n <= 32767 else torch.int32


def sparse_encoding_bytes(m: int, n: int, nnz: int, value_bytes: int) -> dict[str, int]:
    """Bytes of S under each encoding: ``dense`` values, ``bitmask`` + values, ``csr`` (indices + row counts)."""
    idx = torch.tensor([], dtype=_index_dtype(n)).element_size()
    return {
        "dense": m * n * value_bytes,
        "bitmask": (m * n + 7) // 8 + nnz * value_bytes,
        "csr": nnz * (idx + value_bytes) + m * 4,
    }


def choose_encoding(layer: CompressedLinear) -> str | None:
    """The smallest encoding of the layer's S (``None`` when S is absent)."""
    if not layer.has_sparse:
        return None
    if layer.mask_bits is None:
        return "dense"
    quantized = "weight" in layer.quant  # codes of the kept entries: only the index differs
    sizes = sparse_encoding_bytes(layer.out_features, layer.in_features, layer.nnz(),
                                  0 if quantized else layer.element_size)
    sizes.pop("dense")  # dense values would lose the mask (a kept zero and a pruned entry look the same)
    return min(sizes, key=sizes.get)


def _encode_quant(out: dict[str, torch.Tensor], key: str, q: QuantizedPart, mask: torch.Tensor | None) -> None:
    if q.is_packed:  # the inference form holds the stored codes already (8-bit symmetric ones as int8)
        codes = q.packed.view(torch.uint8) ^ 0x80 if (q.bits == 8 and q.symmetric) else q.packed
        out[f"{key}_codes"] = codes.reshape(-1).cpu()
    else:
        out[f"{key}_codes"] = pack_codes(q.codes[mask] if mask is not None else q.codes, q.bits).cpu()
    out[f"{key}_scale"] = q.scale.detach().half()
    if q.zero is not None:
        out[f"{key}_zero"] = pack_codes(q.zero, q.bits)


def encode_layer(layer: CompressedLinear) -> dict[str, torch.Tensor]:
    """The tensors that store one compressed layer (keys without the layer prefix), from either form."""
    out: dict[str, torch.Tensor] = {}
    layer.sync_quant()
    enc = choose_encoding(layer)
    qw = layer.quant.get("weight")
    if enc == "dense":
        if qw is not None:
            _encode_quant(out, "dense", qw, None)
        else:
            out["dense"] = layer.weight.detach()
    elif enc is not None:
        mask = None if (layer.is_compact or qw is not None and qw.is_packed) else layer.mask
        if qw is not None:
            _encode_quant(out, "values", qw, None if mask is None else mask.to(qw.device))
        else:
            out["values"] = layer.s_values.detach() if layer.is_compact else layer.weight.detach()[mask]
        if enc == "bitmask":
            out["mask_bits"] = layer.mask_bits.detach().cpu()
        else:
            mask = layer.mask
            out["col_idx"] = mask.nonzero()[:, 1].to(_index_dtype(layer.in_features))
            out["row_nnz"] = mask.sum(1).to(torch.int32)
    if layer.rank:
        for part, key in _QPREFIX.items():
            q = layer.quant.get(part)
            if q is not None:
                _encode_quant(out, key, q, None)
            else:
                out[key] = getattr(layer, part).detach()
    for k in ("a_in", "a_out", "bias"):
        t = getattr(layer, k)
        if t is not None:
            out[k] = t.detach()
    return out


def quant_spec(layer: CompressedLinear) -> dict[str, Any]:
    """The manifest entry of a layer's quantized parts: ``{part: {bits, group_size, symmetric, method}}``."""
    return {part: q.spec() for part, q in layer.quant.items()}


def stored_bytes(layer: CompressedLinear) -> int:
    """Bytes the saved form of a layer holds (exactly what :func:`encode_layer` writes), from shapes alone."""
    total = 0
    enc = choose_encoding(layer)
    qw = layer.quant.get("weight")
    es = layer.element_size
    if enc is not None:
        m, n, nnz = layer.out_features, layer.in_features, layer.nnz()
        if qw is not None:
            total += sparse_encoding_bytes(m, n, nnz, 0)[enc] + part_bytes(qw, nnz)
        else:
            total += sparse_encoding_bytes(m, n, nnz, es)[enc]
    r = layer.rank
    for part, numel in (("lr_A", r * layer.in_features), ("lr_B", r * layer.out_features)) if r else ():
        q = layer.quant.get(part)
        total += part_bytes(q, numel) if q is not None else numel * es
    for k in ("a_in", "a_out", "bias"):
        t = getattr(layer, k)
        if t is not None:
            total += t.numel() * t.element_size()
    return total


def tensor_sha256(tensor: torch.Tensor) -> str:
    """Hex sha256 of a tensor's raw bytes (row-major; any dtype, bfloat16 included)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return sha256_bytes(flat.view(torch.uint8).numpy().tobytes())


def dense_bytes(layer: CompressedLinear | nn.Linear, dtype: torch.dtype | None = None) -> int:
    """Bytes of the dense layer it replaces: weight and bias in the dtype the model was given
    (the layer's own), or in ``dtype`` (``torch.float32`` for the rate against fp32)."""
    if dtype is not None:
        es = torch.empty(0, dtype=dtype).element_size()
    else:
        es = layer.element_size if isinstance(layer, CompressedLinear) else layer.weight.element_size()
    return (layer.in_features * layer.out_features + (layer.out_features if layer.bias is not None else 0)) * es


def decode_layer(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> CompressedLinear:
    """Rebuild a :class:`CompressedLinear` from its stored tensors and manifest entry, in its inference
    form: the stored tensors are held as they are (codes packed, kept values, mask bits), nothing is
    decoded to floats (:meth:`CompressedLinear.materialize` does that, for training)."""
    m, n = int(info["out_features"]), int(info["in_features"])
    dtype = getattr(torch, info["dtype"])
    enc = info.get("encoding")
    where = f"layer {info.get('name')}"
    quant = info.get("quant") or {}

    def qpart(part: str, key: str, rows: int, cols: int, kept: torch.Tensor | None) -> QuantizedPart:
        """A quantized part from its packed codes (``kept``: the mask bits of the stored codes)."""
        spec = quant[part]
        bits, g = int(spec["bits"]), int(spec["group_size"])
        g = min(g, cols)
        count = rows * cols if kept is None else count_bits(kept)
        packed = tensors[f"{key}_codes"].reshape(-1)
        if packed.dtype != torch.uint8 or packed.numel() != code_bytes(count, bits):
            raise CheckpointError(f"{where}: {key} holds {packed.numel()} bytes of codes, {count} codes of "
                                  f"{bits} bits take {code_bytes(count, bits)}")
        scale = tensors[f"{key}_scale"].to(torch.float16)
        groups = -(-cols // g)
        if tuple(scale.shape) != (rows, groups):
            raise CheckpointError(f"{where}: {key} scales of shape {tuple(scale.shape)}, expected {(rows, groups)}")
        zero = None
        if not spec.get("symmetric", True):
            zero = unpack_codes(tensors[f"{key}_zero"], bits, rows * groups).view(rows, groups)
        if bits == 8 and zero is None:  # held as int8 (code - 128): the bytes integer kernels read
            packed = (packed ^ 0x80).view(torch.int8)
        return QuantizedPart(bits, g, None, scale, zero, str(spec.get("method", "nearest")), shape=(rows, cols),
                             packed=packed, kept=kept)

    params: dict[str, torch.Tensor | None] = {}
    parts: dict[str, QuantizedPart] = {}
    mask_bits = s_values = None
    try:
        if enc == "dense" and "weight" in quant:
            parts["weight"] = qpart("weight", "dense", m, n, None)
        elif enc == "dense":
            params["weight"] = tensors["dense"].reshape(m, n).to(dtype)
        elif enc in ("bitmask", "csr"):
            mask_bits = tensors["mask_bits"].reshape(-1) if enc == "bitmask" else _csr_mask_bits(tensors, m, n, where)
            if mask_bits.numel() != (m * n + 7) // 8:
                raise CheckpointError(f"{where}: {mask_bits.numel()} mask bytes for a {m} x {n} layer")
            if "weight" in quant:
                parts["weight"] = qpart("weight", "values", m, n, mask_bits)
            else:
                kept = count_bits(mask_bits)
                if kept != tensors["values"].numel():
                    raise CheckpointError(f"{where}: mask holds {kept} entries, values {tensors['values'].numel()}")
                s_values = tensors["values"].reshape(-1).to(dtype)
        rank = int(info.get("rank") or 0)
        if "B" in tensors or "B_codes" in tensors:
            for part, key in _QPREFIX.items():
                rows, cols = (m, rank) if part == "lr_B" else (rank, n)
                if part in quant:
                    parts[part] = qpart(part, key, rows, cols, None)
                else:
                    params[part] = tensors[key].reshape(rows, cols).to(dtype)
        for k in ("a_in", "a_out", "bias"):
            if k in tensors:
                params[k] = tensors[k].to(dtype)
        act = info.get("activations") or {}
        return CompressedLinear.inference_form(n, m, dtype, params=params, quant=parts, mask_bits=mask_bits,
                                               s_values=s_values, act_bits=act.get("bits"))
    except (KeyError, RuntimeError, IndexError, ValueError) as exc:
        raise CheckpointError(f"{where}: stored tensors do not fit its manifest entry ({exc})") from None


def _csr_mask_bits(tensors: dict[str, torch.Tensor], m: int, n: int, where: str) -> torch.Tensor:
    """The packed mask of an S stored as CSR column indices and row counts."""
    counts = tensors["row_nnz"].long()
    cols = tensors["col_idx"].long()
    if counts.numel() != m or int(counts.sum()) != cols.numel() or bool((counts < 0).any()):
        raise CheckpointError(f"{where}: row counts do not match the column indices")
    if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= n):
        raise CheckpointError(f"{where}: column index out of range")
    mask = torch.zeros(m, n, dtype=torch.bool)
    mask[torch.repeat_interleave(torch.arange(m), counts), cols] = True
    if int(mask.sum()) != cols.numel():
        raise CheckpointError(f"{where}: a column index repeats within a row")
    return pack_bits(mask)


# ------------------------------------------------------------------------------ save / load
def _model_entry(model: nn.Module) -> dict[str, Any]:
    cls = type(model).__name__
    cfg = getattr(model, "config", None)
    if cls in MODEL_CLASSES and cfg is not None:
        return {"class": cls, "config": cfg.to_dict()}
    return {"class": None, "config": None}


def _check_target(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a directory")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise CheckpointError(f"{path}: directory is not empty; pass overwrite=True (--overwrite) to replace it")


def layer_entry(layer: CompressedLinear) -> dict[str, Any]:
    """The manifest entry of one compressed layer: shape, dtype, encoding, parts, bytes, quantized formats."""
    info: dict[str, Any] = {
        "in_features": layer.in_features, "out_features": layer.out_features,
        "dtype": str(layer.dtype).removeprefix("torch."), "encoding": choose_encoding(layer),
        "nnz": layer.nnz(), "rank": layer.rank,
        "scales": [k for k in ("a_in", "a_out") if getattr(layer, k) is not None],
        "bias": layer.bias is not None, "stored_bytes": stored_bytes(layer), "dense_bytes": dense_bytes(layer),
        "base": None, "quant": quant_spec(layer),
    }
    if layer.act_bits is not None:
        info["activations"] = {"bits": layer.act_bits, "granularity": "token", "symmetric": True}
    if layer.base is not None:
        info["base"] = {"sha256": tensor_sha256(layer.base)}
    return info


def encode_layers(layers: dict[str, CompressedLinear]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors keyed "<layer>::<part>", manifest entries by layer)`` of compressed layers."""
    tensors: dict[str, torch.Tensor] = {}
    info: dict[str, Any] = {}
    for name, layer in layers.items():
        tensors.update({f"{name}::{k}": v for k, v in encode_layer(layer).items()})
        info[name] = layer_entry(layer)
    return tensors, info


def rest_state(inner: nn.Module, skip: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, aliases)``: the model's parameters and buffers outside the modules named by the ``skip``
    prefixes (``"name."``), each storage once; a tensor that shares another's storage is an alias of it."""
    return split_aliases({key: tensor for key, tensor in inner.state_dict(keep_vars=False).items()
                          if not key.startswith(skip) and not tensor.is_meta})


def listed_files(stage: Path, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """``{relative path: {sha256, bytes}}`` of every file under ``stage`` but the manifest, hidden files and
    the relative paths in ``skip``."""
    files: dict[str, Any] = {}
    for f in sorted(p for p in stage.rglob("*") if p.is_file() and p.name != MANIFEST
                    and not p.name.startswith(".")):
        rel = f.relative_to(stage).as_posix()
        if rel not in skip:
            files[rel] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    return files


def build_manifest(inner: nn.Module, wrapper: ModelWrapper | None, layer_info: dict[str, Any],
                   rest_bytes: int, aliases: dict[str, str], files: dict[str, Any], *,
                   config: dict[str, Any] | None = None, records: list[dict[str, Any]] | None = None,
                   shards: list[str] | None = None, extra: dict[str, Any] | None = None,
                   encrypt_key: bytes | None = None, quantized: bool = False, activations: bool = False
                   ) -> dict[str, Any]:
    """The manifest of a checkpoint whose files are written (``files``: :func:`listed_files`).

    ``shards``: tensor files written a block at a time (:mod:`.shards`), each holding the compressed
    layers and the other tensors of its block; ``quantized``/``activations``: whether any layer has
    integer codes / quantized activations (they decide the oldest format version that holds it).
    """
    version = FORMAT_VERSION if activations else 2 if quantized else 1
    manifest = {
        "format": FORMAT,
        # version 1 readers read every checkpoint without integer codes; shards need version 4
        "format_version": SHARDED_VERSION if shards else version,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": _model_entry(inner),
        "wrapper": None if wrapper is None else wrapper.model_type,
        "encrypted": encrypt_key is not None,
        "config": config,
        "stages": records or [],
        "layers": layer_info,
        "aliases": aliases,
        "files": files,
        "stored_bytes": {
            "layers": sum(v["stored_bytes"] for v in layer_info.values()),
            "layers_dense": sum(v["dense_bytes"] for v in layer_info.values()),
            "rest": rest_bytes,
        },
        **(extra or {}),
    }
    if shards:
        manifest["shards"] = list(shards)
    if encrypt_key is not None:
        manifest["key_id"] = key_id(encrypt_key)
    return manifest


def save_compressed(
    model: nn.Module,
    path: str | os.PathLike[str],
    config: dict[str, Any] | None = None,
    records: list[dict[str, Any]] | None = None,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
    encrypt_key: bytes | None = None,
) -> dict[str, Any]:
    """Save a (partly) compressed model in the compact format; returns the manifest.

    Accepts a wrapper (its tokenizer and image processor are saved too) or any ``nn.Module``.
    Every file is written atomically and the manifest last, so a directory without a manifest is
    an unfinished save and is never mistaken for a whole one.
    """
    wrapper = model if isinstance(model, ModelWrapper) else None
    inner = wrapper.model if wrapper is not None else model
    path = Path(path)
    _check_target(path, overwrite)
    replacing = path.is_dir() and any(path.iterdir())
    layers = compressed_layers(inner)
    layer_tensors, layer_info = encode_layers(layers)
    rest, aliases = rest_state(inner, tuple(f"{name}." for name in layers))
    try:
        with atomic_dir(path, mode=0o700 if encrypt_key is not None else None) as stage:
            for fname, tensors in ((LAYERS_FILE, layer_tensors), (REST_FILE, rest)):
                write_tensors(stage / fname, tensors, encrypt_key)
            if wrapper is not None:
                wrapper.save_processors(stage / "processor")
            manifest = build_manifest(
                inner, wrapper, layer_info, sum(t.numel() * t.element_size() for t in rest.values()), aliases,
                listed_files(stage), config=config, records=records, extra=extra, encrypt_key=encrypt_key,
                quantized=any(m.quant for m in layers.values()),
                activations=any(m.act_bits is not None for m in layers.values()))
            atomic_write_json(stage / MANIFEST, manifest, mode=0o600 if encrypt_key else None)
    except OSError as exc:
        kept = "the checkpoint already there is unchanged" if replacing else "nothing was saved"
        raise CheckpointError(f"{path}: could not write the checkpoint: {exc.strerror or exc}; {kept}") from exc
    return manifest


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], key: bytes | None) -> None:
    """Write ``tensors`` as a safetensors file atomically (AES-256-GCM encrypted, mode 0600, with ``key``)."""
    if key is None:
        atomic_save_safetensors(tensors, path)
        return
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    atomic_write_bytes(path, encrypt_bytes(data, key), mode=0o600)


def verified_bytes(root: Path, rel: str, manifest: dict[str, Any], verify: bool = True) -> bytes:
    """The bytes of the listed file ``rel``, read once and checked (size, sha256) as read: what is hashed is
    what is used, so a file replaced between the check and the use cannot slip in. An unlisted file is refused."""
    entry = manifest["files"].get(rel)
    if not isinstance(entry, dict):
        raise CheckpointError(f"{root}: file {rel} is not listed in the manifest")
    f = root / rel
    try:
        data = f.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{root}: file {rel} listed in the manifest is missing") from None
    except OSError as exc:
        raise CheckpointError(f"{f}: cannot read: {exc.strerror or exc}") from None
    if verify:
        recorded = entry.get("bytes")
        if isinstance(recorded, int) and len(data) != recorded:
            how = "truncated" if len(data) < recorded else "longer than saved"
            raise CheckpointError(f"{root}: file {rel} is {how} ({len(data)} bytes, the manifest records {recorded})")
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CheckpointError(f"{root}: file {rel} is corrupt (sha256 mismatch; truncated or modified)")
    return data


def _read_tensors(root: Path, rel: str, key: bytes | None, manifest: dict[str, Any], verify: bool = False
                  ) -> dict[str, torch.Tensor]:
    """The tensors of ``root / rel`` (a listed file of the checkpoint), checked against the manifest as read when
    ``verify``."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = root / rel
    try:
        data = verified_bytes(root, rel, manifest, verify)
        if not manifest.get("encrypted"):
            if data[:len(MAGIC)] == MAGIC:
                raise CheckpointError(f"{path}: file is encrypted but the manifest says it is not")
            return load(data)
        if key is None:
            raise CheckpointError(f"{root}: checkpoint is encrypted; give the key "
                                  "(RCC_CHECKPOINT_KEY or a key file)")
        stored_id = manifest.get("key_id")
        if isinstance(stored_id, str) and stored_id != key_id(key):
            raise CheckpointError(f"{root}: wrong key: the checkpoint was encrypted with key id {stored_id}, "
                                  f"the given key has id {key_id(key)}")
        return load(decrypt_bytes(data, key, what=str(path)))
    except SafetensorError as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file ({exc})") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a checkpoint's manifest (format, version, required fields)."""
    path = Path(path)
    mfile = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not mfile.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST}; the save did not finish or this is not a compressed checkpoint")
    try:
        manifest = json.loads(mfile.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{mfile}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{mfile}: malformed manifest: not UTF-8 text ({exc.reason} at byte {exc.start})"
                              ) from None
    except RecursionError:
        raise CheckpointError(f"{mfile}: malformed manifest: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and integers too long to convert
        raise CheckpointError(f"{mfile}: malformed manifest: {str(exc)[:200]}") from None
    return validate_manifest(manifest, str(mfile))


def validate_manifest(manifest: Any, where: str = MANIFEST) -> dict[str, Any]:
    """Check a parsed manifest's structure; raises :class:`CheckpointError` naming what is wrong."""
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{where}: manifest must be a JSON object")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not an {FORMAT} manifest (format={short(manifest.get('format'))})")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise CheckpointError(f"{where}: unknown format_version {short(version)}; this version reads "
                              f"{', '.join(map(str, READABLE_VERSIONS))}")
    if not isinstance(manifest.get("encrypted", False), bool):
        raise CheckpointError(f"{where}: field 'encrypted' must be true or false")
    inference = manifest.get("inference")
    if inference is not None and not (isinstance(inference, dict)
                                      and inference.get("dtype") in ("float32", "bfloat16", "float16")):
        raise CheckpointError(f"{where}: field 'inference' must name a dtype (float32, bfloat16, float16), "
                              f"got {short(inference)}")
    for key, typ in (("files", dict), ("layers", dict), ("model", dict), ("aliases", dict)):
        if not isinstance(manifest.get(key), typ):
            raise CheckpointError(f"{where}: field {key!r} missing or not a {typ.__name__}")
    shards = manifest.get("shards", [])
    if not isinstance(shards, list) or any(not isinstance(r, str) or r not in manifest["files"] for r in shards):
        raise CheckpointError(f"{where}: field 'shards' must list files the manifest lists, got {short(shards)}")
    if not isinstance(manifest.get("stages") or [], list):
        raise CheckpointError(f"{where}: field 'stages' must be a list of records")
    step_records(manifest.get("stages") or [], where=f"{where}: stages")  # typed, versioned step records
    for rel, entry in manifest["files"].items():
        if (not isinstance(rel, str) or not rel or rel.startswith(("/", "\\")) or "\x00" in rel or "\\" in rel
                or any(part in ("", ".", "..") for part in rel.split("/"))):
            raise CheckpointError(f"{where}: illegal file path {short(rel)}")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise CheckpointError(f"{where}: file entry {short(rel)} needs a sha256")
        size = entry.get("bytes")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise CheckpointError(f"{where}: file entry {short(rel)}: bytes must be a non-negative integer")
    for name, info in manifest["layers"].items():
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: layer entry {short(name)} must be an object")
        for k in ("in_features", "out_features"):
            v = info.get(k)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise CheckpointError(f"{where}: layer {short(name)}: {k} must be a positive integer")
        if info.get("dtype") not in ("float32", "float16", "bfloat16", "float64"):
            raise CheckpointError(f"{where}: layer {short(name)}: unsupported dtype {short(info.get('dtype'))}")
        if info.get("encoding") not in (None, "dense", "bitmask", "csr"):
            raise CheckpointError(f"{where}: layer {short(name)}: unknown encoding {short(info.get('encoding'))}")
        quant = info.get("quant") or {}
        if not isinstance(quant, dict):
            raise CheckpointError(f"{where}: layer {short(name)}: field 'quant' must be an object")
        for part, spec in quant.items():
            ok = (part in ("weight", "lr_A", "lr_B") and isinstance(spec, dict) and spec.get("bits") in BITS
                  and isinstance(spec.get("group_size"), int) and not isinstance(spec.get("group_size"), bool)
                  and spec["group_size"] > 0 and isinstance(spec.get("symmetric", True), bool))
            if not ok:
                raise CheckpointError(f"{where}: layer {short(name)}: bad quantized part {short(part)}: "
                                      f"{short(spec)} (bits one of {BITS}, a positive group_size)")
        act = info.get("activations")
        if act is not None and not (isinstance(act, dict) and act.get("bits") in ACT_BITS
                                    and act.get("granularity", "token") == "token"):
            raise CheckpointError(f"{where}: layer {short(name)}: bad activations entry {short(act)} "
                                  f"(bits one of {ACT_BITS}, granularity 'token')")
    return manifest


def verify_files(path: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
    """Check every file the manifest lists exists with its recorded sha256."""
    path = Path(path)
    for rel, entry in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{path}: file {rel} listed in the manifest is missing")
        size, recorded = f.stat().st_size, entry.get("bytes")
        if isinstance(recorded, int) and size != recorded:
            raise CheckpointError(f"{path}: file {rel} is {'truncated' if size < recorded else 'longer than saved'} "
                                  f"({size} bytes, the manifest records {recorded})")
        if sha256_file(f) != entry["sha256"]:
            raise CheckpointError(f"{path}: file {rel} is corrupt (sha256 mismatch; truncated or modified)")


def _skeleton(manifest: dict[str, Any]) -> nn.Module:
    entry = manifest["model"]
    cls_name = entry.get("class")
    if cls_name not in MODEL_CLASSES or not isinstance(entry.get("config"), dict):
        raise CheckpointError("checkpoint holds a custom nn.Module; pass model=<an instance of the same architecture>")
    import transformers
    from accelerate import init_empty_weights

    model_cls, cfg_cls = (getattr(transformers, n) for n in MODEL_CLASSES[cls_name])
    cfg = cfg_cls.from_dict(entry["config"])
    with init_empty_weights(include_buffers=False):  # parameters on the meta device: nothing dense is made
        return model_cls(cfg)


def tensor_files(manifest: dict[str, Any]) -> list[str]:
    """The checkpoint's tensor files: ``layers.safetensors``, ``rest.safetensors`` and the block shards."""
    return [LAYERS_FILE, REST_FILE, *manifest.get("shards", [])]


def read_tensors(path: Path, manifest: dict[str, Any], key: bytes | None = None, verify: bool = True
                 ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """``(stored tensors grouped by layer name, every other tensor by state-dict key)``, each file read once
    (with ``verify``, the bytes read are checked against the manifest)."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for rel in tensor_files(manifest):
        for k, v in _read_tensors(path, rel, key, manifest, verify).items():
            name, sep, part = k.rpartition("::")
            if sep:
                grouped.setdefault(name, {})[part] = v
            else:
                rest[k] = v
    return grouped, rest


def load_layer_tensors(path: Path, manifest: dict[str, Any], key: bytes | None = None, verify: bool = True
                       ) -> dict[str, dict[str, torch.Tensor]]:
    """Stored tensors grouped by layer name (with ``verify``, the bytes read are checked against the manifest)."""
    return read_tensors(path, manifest, key, verify)[0]


def install_layers(model: nn.Module, manifest: dict[str, Any], grouped: dict[str, dict[str, torch.Tensor]],
                   reference: dict[str, torch.Tensor] | None = None, device: str | torch.device | None = None
                   ) -> None:
    """Put the stored compressed layers, in their inference form, into ``model`` (replacing Linear or
    compressed layers) on ``device`` (default: the device of the module each replaces)."""
    for name, info in manifest["layers"].items():
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"layer {name!r} of the checkpoint does not exist in the model") from None
        layer = decode_layer(grouped.get(name, {}), {**info, "name": name})
        base_info = info.get("base")
        if base_info is not None:
            if reference is None or name not in reference:
                raise CheckpointError(f"layer {name!r} was compressed as a delta: pass reference_model=...")
            layer.set_base(reference[name])
            recorded = base_info.get("sha256") if isinstance(base_info, dict) else None
            if not isinstance(recorded, str):
                raise CheckpointError(f"layer {name!r}: the manifest records no sha256 of its base weight")
            if tensor_sha256(layer.base) != recorded:
                raise CheckpointError(
                    f"layer {name!r}: the reference model given is not the base this checkpoint was compressed "
                    f"against (sha256 of its {info.get('dtype')} weight differs); pass the same base model")
        ref = next(current.parameters(), None)
        target = device if device is not None else (ref.device if ref is not None and not ref.is_meta else None)
        replace_module(model, name, layer.to(target) if target is not None else layer)


def install_rest(path: Path, manifest: dict[str, Any], model: nn.Module, key: bytes | None = None,
                 verify: bool = True, rest: dict[str, torch.Tensor] | None = None) -> None:
    """Load every parameter and buffer outside the compressed layers (``rest.safetensors`` and the shards'
    other tensors, or ``rest`` when already read by :func:`read_tensors`) into ``model``."""
    if rest is None:
        rest = read_tensors(path, manifest, key, verify)[1]
    for alias, original in manifest["aliases"].items():
        if original in rest:
            rest[alias] = rest[original]
    skeleton = any(p.is_meta for p in model.parameters())  # a model made on the meta device takes the tensors
    try:
        missing, unexpected = model.load_state_dict(rest, strict=False, assign=skeleton)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: state does not fit the model: {str(exc).splitlines()[-1].strip()[:300]}"
                              ) from None
    missing = [k for k in missing if not any(k.startswith(f"{n}.") for n in manifest["layers"])]
    if missing or unexpected:
        raise CheckpointError(f"{path}: state does not match the model: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    if skeleton:
        left = [n for n, p in model.named_parameters() if p.is_meta]
        if left:
            raise CheckpointError(f"{path}: the checkpoint holds no values for {left[:3]}")
        if hasattr(model, "tie_weights"):
            model.tie_weights()


def load_compressed(
    path: str | os.PathLike[str],
    model: nn.Module | None = None,
    reference_model: nn.Module | None = None,
    device: str | torch.device = "cpu",
    key: bytes | None = None,
    verify: bool = True,
    form: str = "inference",
    dtype: str | torch.dtype | None = "recorded",
) -> nn.Module:
    """Load a compressed checkpoint; returns a wrapper when the checkpoint had processors, else the module.

    ``model`` supplies the architecture for custom modules; HF CLIP/BLIP are rebuilt from the
    manifest, with their parameters on the meta device until the stored tensors take their place
    (nothing dense is ever allocated). Only the files the manifest lists are read, each once, and
    with ``verify`` the bytes read are checked against its size and sha256 before they are used (no
    gap between check and use); files added to the directory (a ``processor_config.json``, an
    ``added_tokens.json``) are ignored, with a warning. The compressed layers come in their
    inference form (``form="inference"``: the model holds what the checkpoint stores, parts decoded
    per call; ``train()`` makes float parameters for training) or in the working form
    (``form="working"``: float parameters, as the compression stages use). ``dtype`` is the compute
    dtype: ``"recorded"`` (the one the compress job measured fastest within its gate, when the
    manifest records one; else as stored), ``None`` (as stored) or a dtype.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        for rel in manifest["files"]:  # every listed file there before anything is read
            if not (path / rel).is_file():
                raise CheckpointError(f"{path}: file {rel} listed in the manifest is missing")
    wrapper = model if isinstance(model, ModelWrapper) else None
    inner = wrapper.model if wrapper is not None else (model if model is not None else _skeleton(manifest))
    reference = None
    if reference_model is not None:
        ref_inner = unwrap_model(reference_model)
        reference = {n: m.weight.detach() for n, m in ref_inner.named_modules() if isinstance(m, nn.Linear)}
        reference.update({n: m.inner_weight().detach() for n, m in compressed_layers(ref_inner).items()})
    grouped, rest = read_tensors(path, manifest, key, verify)
    install_layers(inner, manifest, grouped, reference, device)
    install_rest(path, manifest, inner, key, verify, rest)
    del grouped, rest
    inner.to(device).eval()
    target = (manifest.get("inference") or {}).get("dtype") if dtype == "recorded" else dtype
    if target is not None:
        inner.to(getattr(torch, target) if isinstance(target, str) else target)
    if form == "working":
        to_working(inner)
    elif form != "inference":
        raise ValueError(f"form must be 'inference' or 'working', got {form!r}")
    release_memory()  # the file bytes read and decoded are freed: hand their pages back
    if wrapper is not None:
        return wrapper
    listed = [rel for rel in manifest["files"] if rel.startswith("processor/")]
    if manifest.get("wrapper") and listed:
        img, tok = load_listed_processors(path, manifest, verify)
        return wrap_model(inner, img, tok, name=str(path))
    return inner


def load_listed_processors(path: Path, manifest: dict[str, Any], verify: bool = True) -> tuple[Any, Any]:
    """(image processor, tokenizer) from the checkpoint's listed ``processor/`` files only.

    Each listed file is read once (and checked, with ``verify``) and written to a private temporary
    directory the processors load from, so neither an unlisted file beside them nor a file changed
    after its check reaches them.
    """
    listed = sorted(rel for rel in manifest["files"] if rel.startswith("processor/"))
    proc_dir = path / "processor"
    present = (p.relative_to(path).as_posix() for p in proc_dir.rglob("*") if p.is_file()) if proc_dir.is_dir() else ()
    extra = sorted(rel for rel in present if rel not in manifest["files"])
    if extra:
        log.warning("%s: ignoring %d file(s) the manifest does not list: %s", path, len(extra), ", ".join(extra[:5]))
    with tempfile.TemporaryDirectory(prefix="rcc-processor-") as tmp:
        for rel in listed:
            target = Path(tmp) / rel.removeprefix("processor/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(verified_bytes(path, rel, manifest, verify))
        return _load_processors(tmp, manifest["wrapper"])


def export_dense(model: nn.Module, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Write a plain Hugging Face model directory (compressed layers merged back to dense Linear).

    The result loads with ``CLIPModel.from_pretrained`` / ``BlipForConditionalGeneration.from_pretrained``
    without this package.
    """
    wrapper = model if isinstance(model, ModelWrapper) else None
    inner = wrapper.model if wrapper is not None else model
    if not hasattr(inner, "save_pretrained"):
        raise CheckpointError(f"export_dense needs a Hugging Face model, got {type(inner).__name__}")
    path = Path(path)
    _check_target(path, overwrite)
    dense = merge_all(copy.deepcopy(inner))
    with atomic_dir(path) as staging:  # the old directory stays until the new one is whole
        dense.save_pretrained(staging, safe_serialization=True)
        if wrapper is not None:
            wrapper.save_processors(staging)
    return path
