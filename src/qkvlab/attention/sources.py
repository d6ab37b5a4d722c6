"""Where weights come from: a live module, or a checkpoint read lazily from disk.

A source exposes parameter names, their shapes, one tensor at a time, and the HF
config (if any). On disk nothing is loaded until asked for, and nothing is memory-mapped: each tensor is
read with one ``pread`` into memory that the caller owns and frees, so resident memory holds one
layer's attention at a time whatever the checkpoint's size or shard layout (a memory map keeps every
page it touched resident until the map is closed, which for a 10 GB shard is most of the run).
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qkvlab.attention.packaged import PACKAGED_MODELS, resolve_packaged
from qkvlab.attention.tensors import TensorSource
from qkvlab.errors import UserError

__all__ = [
    "PACKAGED_MODELS",
    "SAFETENSORS_DTYPES",
    "DiskSource",
    "LiveSource",
    "TensorSource",
    "load_source",
    "resolve_packaged",
]


_HEAD_ATTRS = ("num_heads", "n_heads", "n_head", "num_attention_heads")


@dataclass
class LiveSource(TensorSource):
    """A ``torch.nn.Module`` in memory. Tensors are the module's own (detached, not copied); a parameter
    that FSDP2 shards is gathered whole when asked for, a collective that every rank must make alike."""

    module: nn.Module
    name: str = "<module>"
    config: dict[str, Any] = field(default_factory=dict)
    heads_hint: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.module = _unwrap(self.module)
        self._tensors: dict[str, torch.Tensor] = dict(self.module.state_dict(keep_vars=False))
        # PEFT LoRA: expose the effective weight W + ΔW under the un-wrapped name, computed on demand.
        self._adapted: dict[str, nn.Module] = {}
        for prefix, sub in self.module.named_modules():
            if (
                hasattr(sub, "base_layer")
                and hasattr(sub, "get_delta_weight")
                and f"{prefix}.base_layer.weight" in self._tensors
            ):
                del self._tensors[f"{prefix}.base_layer.weight"]
                self._adapted[f"{prefix}.weight"] = sub
                self._tensors[f"{prefix}.weight"] = sub.base_layer.weight
        hf_config = getattr(self.module, "config", None)
        if not hasattr(hf_config, "to_dict"):
            # a wrapper of one HF model (a LightningModule, a user's nn.Module holding ``self.model``): its
            # config, where exactly one distinct config sits below
            found = {
                id(c): c
                for _, sub in self.module.named_modules()
                if hasattr(c := getattr(sub, "config", None), "to_dict") and hasattr(c, "model_type")
            }
            hf_config = next(iter(found.values())) if len(found) == 1 else None
        if hf_config is not None and hasattr(hf_config, "to_dict"):
            self.config = hf_config.to_dict()
        for prefix, sub in self.module.named_modules():
            # nn.MultiheadAttention, timm's Attention and most hand-written blocks say it themselves.
            heads = next(
                (getattr(sub, a) for a in _HEAD_ATTRS if isinstance(getattr(sub, a, None), int)), None
            )
            if heads:
                self.heads_hint[f"{prefix}." if prefix else ""] = heads
        if self.name == "<module>":
            self.name = type(self.module).__name__

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def get(self, key: str) -> torch.Tensor:
        adapted = self._adapted.get(key)
        if adapted is None:
            tensor = self._tensors[key].detach()
            if type(tensor) is not torch.Tensor:  # a DTensor (FSDP2): gathered whole, on every rank alike
                from qkvlab.dtensors import full

                tensor = full(tensor)
            return tensor
        if getattr(adapted, "merged", False):
            return adapted.base_layer.weight.detach()
        # PEFT's own merge on a copy of this one layer: exact for LoRA, DoRA (magnitude rescaling) and
        # fan_in_fan_out layers alike, and the live model is untouched.
        import copy

        with torch.no_grad():
            layer = copy.deepcopy(adapted)
            active = [n for n in layer.active_adapters if n in getattr(layer, "lora_A", {})]
            if active:
                layer.merge(adapter_names=active)
            return layer.base_layer.weight.detach()


def _unwrap(module: nn.Module) -> nn.Module:
    """DistributedDataParallel / FSDP-style wrappers hold the model in ``.module``."""
    while isinstance(module, nn.parallel.DistributedDataParallel | nn.DataParallel):
        module = module.module
    return module


#: safetensors dtype names → torch dtypes (the format's own table, for the dtypes torch has)
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


class DiskSource(TensorSource):
    """A HF model folder (``model.safetensors`` or sharded with ``model.safetensors.index.json``)
    or a single ``.safetensors`` file. Only the headers are read up front; each tensor is read on
    request with one ``pread`` (no memory map), so memory is freed as soon as the caller drops it."""

    def __init__(self, path: Path, display_name: str | None = None) -> None:
        self._fds: dict[Path, int] = {}  # first, so close() works whatever __init__ refuses below
        self.path = path
        self.name = display_name or str(path)
        self.heads_hint = {}
        folder = path if path.is_dir() else path.parent
        self.config = _read_config(folder / "config.json") if (folder / "config.json").is_file() else {}
        self._entries: dict[str, _Entry] = {}
        for file in _weight_files(path):
            header, data_start = _read_safetensors_header(file)
            for key, entry in header.items():
                if key != "__metadata__":
                    begin, end = entry["data_offsets"]
                    shape = tuple(entry["shape"])
                    self._entries[key] = _Entry(
                        file, entry["dtype"], shape, data_start + begin, data_start + end
                    )
        if not self._entries:
            raise UserError(f"{path} holds no tensors")

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key].shape

    def get(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        dtype = SAFETENSORS_DTYPES.get(entry.dtype)
        if dtype is None:
            raise UserError(f"tensor {key} in {entry.file} has dtype {entry.dtype}, which torch cannot hold")
        size = entry.end - entry.start
        buffer = torch.empty(size, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        fd = self._fd(entry.file)
        done = 0
        while done < size:  # pread may return less than asked (large reads, signals)
            got = os.preadv(fd, [view[done:]], entry.start + done)
            if got == 0:
                raise UserError(f"{entry.file} ended early while reading tensor {key}; is it truncated?")
            done += got
        if dtype.itemsize > 1 and size % dtype.itemsize:
            raise UserError(
                f"tensor {key} in {entry.file}: {size} bytes is not a whole number of {entry.dtype}"
            )
        tensor = buffer.view(dtype)
        count = 1
        for n in entry.shape:
            count *= n
        if tensor.numel() != count:
            raise UserError(
                f"tensor {key} in {entry.file} has {tensor.numel()} values for shape {list(entry.shape)}"
            )
        return tensor.reshape(entry.shape)

    def _fd(self, file: Path) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(file, os.O_RDONLY)
        return self._fds[file]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        self.close()


class StateDictSource(TensorSource):
    """Tensors from a torch checkpoint file (``.pt/.pth/.bin/.ckpt``), read only through torch's restricted
    unpickler (``torch.load(weights_only=True)``, memory-mapped for torch's zip format): it rebuilds
    tensors and plain containers and refuses every other global, so a checkpoint cannot run code.

    Understood shapes: a state dict; nanoGPT's ``{"model": state dict, "model_args": {...}}`` (its
    ``model_args`` give the head count); ``{"state_dict": …}`` (Lightning); a HF folder whose weights are
    ``pytorch_model.bin`` (sharded with ``pytorch_model.bin.index.json`` too), its ``config.json`` beside
    them. ``_orig_mod.`` (``torch.compile``) and ``module.`` (DDP) prefixes are stripped.
    """

    def __init__(self, files: list[Path], config: dict[str, Any], display_name: str) -> None:
        self.name = display_name
        self.heads_hint = {}
        self.config = dict(config)
        self._tensors: dict[str, torch.Tensor] = {}
        for file in files:
            tensors, extra_config = _torch_checkpoint(file)
            self._tensors.update(tensors)
            self.config = {**extra_config, **self.config}
        if not self._tensors:
            raise UserError(f"{display_name} holds no tensors")

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]


TORCH_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".ckpt"})


def _torch_checkpoint(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, config found inside) of one torch checkpoint file, through ``weights_only=True``."""
    import pickle
    import warnings
    import zipfile

    try:
        with warnings.catch_warnings():  # torch notes a pickle protocol it did not write itself: harmless
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{file}: torch's restricted loader (weights_only=True) refused it ({reason[:200]}); qkvlab never "
            "runs a full unpickle, which can run code: save the state dict with safetensors.torch.save_file"
        ) from None
    config: dict[str, Any] = {}
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):  # nanoGPT's ckpt.pt
        args = loaded.get("model_args")
        config = dict(args) if isinstance(args, dict) else {}
        loaded = loaded["model"]
    elif isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):  # Lightning
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not any(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise UserError(
            f"{file} holds no state dict (a mapping of names to tensors, or nanoGPT's {{'model': …}}); "
            f"found {type(loaded).__name__}"
        )
    tensors = {}
    for key, value in loaded.items():
        if isinstance(value, torch.Tensor):
            name = str(key)
            for prefix in ("_orig_mod.", "module."):  # torch.compile, DistributedDataParallel
                name = name.removeprefix(prefix)
            tensors[name] = value
    return tensors, config


def _torch_weight_files(folder: Path) -> list[Path] | None:
    """A HF folder's ``pytorch_model.bin`` (or its shards), when it has no safetensors weights."""
    index = folder / "pytorch_model.bin.index.json"
    if index.is_file():
        return _shard_files(index, folder)
    single = folder / "pytorch_model.bin"
    return [single] if single.is_file() else None


def _shard_files(index: Path, folder: Path) -> list[Path]:
    """The shard files a HF ``*.index.json`` names (safetensors or torch), each inside ``folder`` and present."""
    weight_map = _read_config(index).get("weight_map")
    if not isinstance(weight_map, Mapping) or not weight_map:
        raise UserError(f"{index} has no 'weight_map'")
    names = list(dict.fromkeys(weight_map.values()))
    bad = [n for n in names if not isinstance(n, str) or Path(n).is_absolute() or ".." in Path(n).parts]
    if bad:
        raise UserError(f"{index} maps tensors to {bad[0]!r}; accepted: shard file names inside {folder}")
    files = [folder / name for name in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{index} lists shards that are missing: {', '.join(missing)}")
    return files


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} must hold a JSON object, found {type(config).__name__}")
    return config


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix != ".safetensors":
            pickled = (
                " (a torch checkpoint: `qkvlab inspect` reads one through torch's restricted loader, "
                "weights_only=True; this command loads safetensors only: save its state dict with "
                "safetensors.torch.save_file)"
                if path.suffix in TORCH_SUFFIXES
                else ""
            )
            raise UserError(
                f"{path} is not a .safetensors file{pickled}; accepted: a HF model folder, a .safetensors file"
            )
        return [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return _shard_files(index, path)
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(p.name for p in path.glob("*.safetensors"))
    if len(others) == 1:
        return [path / others[0]]
    found = sorted(p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
    hint = (
        f" (found {', '.join(found)}: `qkvlab inspect` reads torch checkpoints through torch's restricted "
        "loader, weights_only=True; this command loads safetensors only, and never a full unpickle)"
        if found
        else ""
    )
    raise UserError(
        f"no safetensors weights in {path}{hint}; accepted: model.safetensors or model.safetensors.index.json"
    )


def _read_safetensors_header(file: Path) -> tuple[dict[str, Any], int]:
    """The header of a safetensors file and where its data starts, checked so that a non-safetensors,
    garbled or truncated file is one clear line naming it."""
    size = file.stat().st_size
    with file.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise UserError(f"{file} is not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8 or header_len > 100_000_000:
            raise UserError(f"{file} is not a safetensors file, or it is truncated (bad header length)")
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{file} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{file} is not a safetensors file (its header is not a JSON object)")
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]
            and isinstance(shape, list)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
            and isinstance(entry.get("dtype"), str)
        ):
            raise UserError(f"{file} is not a valid safetensors file (bad entry for tensor {key!r})")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise UserError(
            f"{file} is truncated: its header needs {8 + header_len + end} bytes, the file has {size}"
        )
    return header, 8 + header_len


_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _hub_cache_folder(name: str) -> Path | None:
    """The local snapshot of Hub model ``name`` (``bert-base-uncased``, ``org/model``) if the Hugging Face
    cache holds one; never a download."""
    if not _HUB_NAME.fullmatch(name) or name.endswith(".safetensors"):
        return None
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), or a name the hub library refuses
        return None
    return folder if (folder / "config.json").is_file() else None


def download_hub_model(name: str) -> Path:
    """Fetch Hub model ``name`` into the local Hugging Face cache (config, tokenizer, safetensors weights
    only) and return its folder; only on the user's explicit ``--download``. Offline, or a name the Hub
    does not have, is one line."""
    if not _HUB_NAME.fullmatch(name):
        raise UserError(f"--download {name}: not a Hub model name (NAME or ORG/NAME)")
    try:
        from huggingface_hub import snapshot_download

        folder = Path(
            snapshot_download(
                name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]
            )
        )
    except Exception as exc:  # offline (HF_HUB_OFFLINE), not found, no network: the hub library's own words
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--download {name}: the Hub could not be read ({reason[:200]})") from None
    return folder


def load_source(source: nn.Module | str | os.PathLike[str]) -> TensorSource:
    """A live module, a packaged name (``minilm``), a HF model folder, a ``.safetensors`` file, or a
    ``qkvlab train`` run folder (its latest checkpoint)."""
    if isinstance(source, nn.Module):
        return LiveSource(source)
    text = str(source)
    if text in PACKAGED_MODELS:
        packaged = resolve_packaged(text)
        if _is_gguf(packaged):
            return _open_gguf(packaged, text)
        return DiskSource(packaged, display_name=text)
    path = Path(text).expanduser()
    if not path.exists():
        cached = _hub_cache_folder(text)
        if cached is not None:
            return DiskSource(cached, display_name=text)
        names = ", ".join(PACKAGED_MODELS)
        hub = (
            f", nor a Hub model in the local Hugging Face cache ({_hub_cache_dir()}); qkvlab reads no hub at "
            f"run time: download it once (`qkvlab inspect {text} --download`, or `hf download {text}`) or give its folder"
            if _HUB_NAME.fullmatch(text)
            else ""
        )
        raise UserError(
            f"no such file or folder: {text}{hub}; accepted: a HF model folder, a .safetensors or .gguf file, "
            f"or a packaged name ({names})"
        )
    for reader in READERS:
        if reader.claims(path):
            return reader.open(path, text)
    return DiskSource(path)  # names what is missing: no safetensors, no torch weights, no run


# -- readers of weights on disk, by what the path holds (a new kind adds one entry) --


@dataclass(frozen=True)
class Reader:
    """One kind of weights on disk: ``claims(path)`` says whether ``path`` holds it; ``open`` reads it."""

    name: str
    claims: Callable[[Path], bool]
    open: Callable[[Path, str], TensorSource]


def _has_safetensors(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".safetensors"
    return (path / "model.safetensors").is_file() or any(path.glob("*.safetensors*"))


def _open_run(path: Path, text: str) -> TensorSource:
    from qkvlab.files import latest_checkpoint

    checkpoint = latest_checkpoint(path)
    assert checkpoint is not None
    return DiskSource(checkpoint, display_name=f"{text.rstrip('/')} ({checkpoint.name})")


def _is_run(path: Path) -> bool:
    if not path.is_dir() or _has_safetensors(path):
        return False
    from qkvlab.files import latest_checkpoint

    return latest_checkpoint(path) is not None


def _open_torch(path: Path, text: str) -> TensorSource:
    folder = path.parent if path.is_file() else path
    config = _read_config(folder / "config.json") if (folder / "config.json").is_file() else {}
    files = [path] if path.is_file() else _torch_weight_files(path)
    assert files is not None
    return StateDictSource(files, config, text)


def _is_torch(path: Path) -> bool:
    if path.is_file():
        return path.suffix in TORCH_SUFFIXES
    return path.is_dir() and not _has_safetensors(path) and _torch_weight_files(path) is not None


def _open_gguf(path: Path, text: str) -> TensorSource:
    from qkvlab.attention.gguf import GGUFSource

    return GGUFSource(path, display_name=text)


def _is_gguf(path: Path) -> bool:
    from qkvlab.attention.gguf import is_gguf

    return path.suffix == ".gguf" or is_gguf(path)


#: In order: a GGUF file (llama.cpp's format, dequantised tensor by tensor), a safetensors file or folder
#: (streamed, header by header), a ``qkvlab train`` run folder (its latest checkpoint), a torch checkpoint
#: (through torch's restricted unpickler only).
READERS: tuple[Reader, ...] = (
    Reader("gguf", _is_gguf, _open_gguf),
    Reader("safetensors", _has_safetensors, lambda path, text: DiskSource(path)),
    Reader("qkvlab-run", _is_run, _open_run),
    Reader("torch", _is_torch, _open_torch),
)
