"""Where a model's weights are while it is compressed a block at a time: resident, or in its checkpoint's files.

Placement goes through Hugging Face Accelerate, the ecosystem's engine for models that do not fit:

* :class:`CheckpointSource` builds the model on the meta device (``init_empty_weights``: its modules
  without storage) and indexes the checkpoint's safetensors files as Accelerate's disk offload does
  (an offload index whose entries name the safetensors file and key; ``OffloadedWeightsLoader`` reads a
  tensor when it is asked for, nothing is copied). Everything outside the transformer blocks is loaded
  once (``set_module_tensor_to_device``); a block is loaded while it is worked on and put back on the
  meta device after it is written, so resident weights never exceed the parts outside the blocks and a
  block or two.
* :class:`ResidentSource` is a model already in memory: nothing is loaded, and a compressed block
  stays in the model (the result is the model itself).
* :func:`block_devices`: with several GPUs, which one each block runs on, from Accelerate's
  ``infer_auto_device_map`` (blocks are never split); else the one compute device.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import CompressionError, ModelLoadError
from ..models.registry import FAMILIES, detect_model_type
from ..utils.logging import get_logger
from .layers import held_tensor_bytes

log = get_logger("placement")

SAFETENSORS_INDEX = "model.safetensors.index.json"


def checkpoint_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The safetensors files of a Hugging Face model directory (one file, or the shards its index names)."""
    root = Path(directory)
    index = root / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index}: not a safetensors index ({exc})") from None
        return [root / f for f in sorted(set(weight_map.values()))]
    single = root / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(root.glob("*.safetensors"))
    if not found:
        raise ModelLoadError(f"{root}: no safetensors weights (model.safetensors or {SAFETENSORS_INDEX}); "
                             "the sequential pipeline reads safetensors checkpoints only (save with "
                             "save_pretrained(..., safe_serialization=True))")
    return found


def checkpoint_bytes(directory: str | os.PathLike[str]) -> int:
    """Bytes of a model directory's weight files."""
    return sum(f.stat().st_size for f in checkpoint_files(directory))


class CheckpointWeights(Mapping[str, torch.Tensor]):
    """The tensors of a safetensors checkpoint by name, each read when looked up.

    An Accelerate offload index over the files (``{"safetensors_file", "weight_name"}`` per tensor)
    read by ``OffloadedWeightsLoader``: a lookup opens the file, copies that tensor out and closes it,
    so the process holds the copy and nothing of the file's mapping.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        from accelerate.utils import OffloadedWeightsLoader
        from safetensors import safe_open

        index: dict[str, dict[str, str]] = {}
        for f in checkpoint_files(directory):
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                    index[key] = {"safetensors_file": str(f), "weight_name": key}
        self.index = index
        self._loader = OffloadedWeightsLoader(index=index)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._loader[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


def skeleton(directory: str | os.PathLike[str], model_type: str | None = None) -> nn.Module:
    """The model of a Hugging Face directory with its parameters on the meta device (buffers real, small)."""
    import transformers
    from accelerate import init_empty_weights

    cfg_file = Path(directory) / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{cfg_file}: cannot read the model config ({exc})") from None
    mtype = model_type or detect_model_type(cfg)
    cls = getattr(transformers, FAMILIES[mtype][0])
    config = cls.config_class.from_dict(cfg)
    with init_empty_weights(include_buffers=False):
        model = cls(config)
    return model.eval()


class ResidentSource:
    """A model already in memory: blocks are there to be worked on, and stay (compressed) when done."""

    resident = True

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def load_rest(self, blocks: Sequence[str], device: torch.device) -> None:
        """Everything is resident already."""

    def materialize(self, name: str, device: torch.device) -> nn.Module:
        """Block ``name`` on ``device``."""
        return self.model.get_submodule(name).to(device)

    def release(self, name: str) -> None:
        """A finished block stays in the model: the model is the result."""

    def resident_bytes(self) -> int:
        return held_tensor_bytes(self.model)


class CheckpointSource:
    """A model read from its checkpoint's safetensors files a block at a time (see the module docstring).

    ``dtype``: the dtype blocks are computed in (the checkpoint's own when ``None``).
    """

    resident = False

    def __init__(self, directory: str | os.PathLike[str], model_type: str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        self.directory = Path(directory)
        self.model = skeleton(directory, model_type)
        self.weights = CheckpointWeights(directory)
        self.dtype = dtype
        self._templates: dict[str, nn.Module] = {}

    def load_rest(self, blocks: Sequence[str], device: torch.device) -> None:
        """Load every tensor outside ``blocks`` (embeddings, norms, heads) onto ``device``; tied weights tied again."""
        skip = tuple(f"{b}." for b in blocks)
        for name, mod in self.model.named_modules():
            if name in blocks or name.startswith(skip):
                continue
            self._load_own(mod, name, device)
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()

    def _load_own(self, module: nn.Module, prefix: str, device: torch.device) -> None:
        """Load ``module``'s own tensors (not its children's)."""
        from accelerate.utils import set_module_tensor_to_device

        for local, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            key = f"{prefix}.{local}" if prefix else local
            if not t.is_meta:
                if t.device != device:
                    set_module_tensor_to_device(self.model, key, device)
                continue
            if key not in self.weights:
                if _tied_elsewhere(self.model, key):
                    continue
                raise ModelLoadError(f"{self.directory}: the checkpoint holds no values for {key}")
            value = self.weights[key]
            dtype = self.dtype if (self.dtype is not None and value.is_floating_point()) else value.dtype
            set_module_tensor_to_device(self.model, key, device, value=value, dtype=dtype)

    def materialize(self, name: str, device: torch.device) -> nn.Module:
        """Read block ``name`` from the checkpoint onto ``device``; :meth:`release` gives it back."""
        block = self.model.get_submodule(name)
        self._templates[name] = copy.deepcopy(block)  # its structure, on the meta device (no storage)
        for local, mod in block.named_modules():
            self._load_own(mod, f"{name}.{local}" if local else name, device)
        return self.model.get_submodule(name)

    def release(self, name: str) -> None:
        """Put block ``name`` back on the meta device: its tensors (written already) are freed."""
        template = self._templates.pop(name, None)
        if template is None:
            return
        parent, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, template)

    def resident_bytes(self) -> int:
        return held_tensor_bytes(self.model)


def _tied_elsewhere(model: nn.Module, key: str) -> bool:
    """Whether ``key`` is one of the tied weights the model declares (filled by ``tie_weights``)."""
    tied = getattr(model, "_tied_weights_keys", None) or ()
    if isinstance(tied, Mapping):
        tied = list(tied)
    return any(key == k or key.endswith(f".{k}") for k in tied)


def block_devices(model: nn.Module, blocks: Iterable[str], device: torch.device,
                  max_memory: Mapping[int | str, int | str] | None = None) -> dict[str, torch.device]:
    """The device each block runs on: ``device``, or with several GPUs (or a ``max_memory`` naming several)
    the one Accelerate's ``infer_auto_device_map`` places it on (blocks unsplit, GPUs filled in order)."""
    blocks = list(blocks)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if max_memory is None and gpus < 2:
        return dict.fromkeys(blocks, device)
    from accelerate import infer_auto_device_map

    if max_memory is None:
        max_memory = {i: torch.cuda.mem_get_info(i)[0] for i in range(gpus)}
    classes = sorted({type(model.get_submodule(b)).__name__ for b in blocks})
    placed = infer_auto_device_map(model, max_memory=dict(max_memory), no_split_module_classes=classes)
    out: dict[str, torch.device] = {}
    for b in blocks:
        where = next((v for k, v in sorted(placed.items(), key=lambda kv: -len(kv[0]))
                      if b == k or b.startswith(f"{k}.") or k == ""), None)
        if isinstance(where, int):
            out[b] = torch.device("cuda", where)
        elif where is None or where in ("cpu", "disk"):
            out[b] = device if device.type != "cuda" or where is None else torch.device("cpu")
        else:
            out[b] = torch.device(where)
    return out


def model_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers, resident or not (what it takes when materialised)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (id(t), t.numel())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def check_supported(model: nn.Module) -> None:
    """Refuse models whose towers read hidden states of inner blocks (the sequential pipeline hands on
    only a stack's last output)."""
    mtype = str(getattr(getattr(model, "config", None), "model_type", "") or "")
    if mtype == "llava":
        raise CompressionError("the sequential pipeline does not support LLaVA yet: its language model reads the "
                               "vision tower's hidden states of an inner block (vision_feature_layer); use "
                               "pipeline='whole'")


__all__ = ["CheckpointSource", "CheckpointWeights", "ResidentSource", "block_devices", "checkpoint_bytes",
           "checkpoint_files", "check_supported", "model_bytes", "skeleton"]
