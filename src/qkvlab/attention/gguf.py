"""GGUF checkpoints (llama.cpp's format) as a weight source, read with ``gguf``, the llama.cpp project's
own Python reader.

- **Tensors** are memory-mapped by ``gguf.GGUFReader`` and dequantised to float32 one at a time, on
  request (``gguf.quants.dequantize``), so memory stays at one tensor, as with the safetensors reader.
  GGUF lists a tensor's dimensions fastest first; read back they are torch's (out, in).
- **Names** stay llama.cpp's (``blk.N.attn_q.weight`` …): the architecture table has their layout
  (``families._GGUF``), so nothing is renamed.
- **Metadata** becomes a HF-style config: ``general.architecture`` → ``model_type`` (``gemma3`` →
  ``gemma3_text``), and ``{arch}.block_count``, ``.attention.head_count``, ``.attention.head_count_kv``,
  ``.embedding_length``, ``.attention.key_length`` → the layer and head counts, d_model and d_head.
- **llama.cpp's Q/K row permutation** is undone for the architectures its converter permutes (llama,
  mistral: it reorders each head's rows from rotate-half to interleaved pairs), as transformers' GGUF
  loader does. Per-head products W_KᵀW_Q do not change under it (the same rows of q and k move
  together); per-rotary-plane quantities do.
- **Storage types** (``F32``, ``Q8_0``, ``Q4_K``, …) are kept per tensor (:meth:`GGUFSource.storage_types`):
  quantised weights are values on a 4–8-bit grid, and ``qkvlab.inspect`` says so under its table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qkvlab.attention.tensors import TensorSource
from qkvlab.errors import UserError

__all__ = [
    "GGUF_MAGIC",
    "MEASURED_FLOORS",
    "PERMUTED_ARCHITECTURES",
    "GGUFSource",
    "is_gguf",
    "noise_floor",
    "undo_rope_permutation",
]

GGUF_MAGIC = b"GGUF"
#: Architectures whose Q and K rows llama.cpp's converter permutes (``LlamaModel.permute``).
PERMUTED_ARCHITECTURES = frozenset({"llama", "mistral"})
#: GGUF's architecture name → the ``model_type`` the architecture table knows it by.
_MODEL_TYPES = {"gemma3": "gemma3_text"}
#: GGUF metadata (after ``{arch}.``) → HF config key.
_CONFIG = {
    "block_count": "num_hidden_layers",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "embedding_length": "hidden_size",
    "attention.key_length": "head_dim",
}
#: Storage types that are not quantised.
FLOAT_TYPES = frozenset({"F32", "F16", "BF16", "F64"})

#: ‖ΔM‖₂/σ₁ of a head's product after quantising its weights, the largest over every head of MiniLM and
#: mpnet (``benchmarks/bench_gguf.py``, BENCHMARKS.md §8): by Weyl's inequality each σᵢ/σ₁ moves by at
#: most this, so rank at an rtol below it counts quantisation noise. Measured for the formats gguf's
#: Python quantiser writes.
MEASURED_FLOORS = {"Q8_0": 0.011, "Q5_0": 0.078, "Q4_0": 0.16}


def noise_floor(kind: str) -> float:
    """The rtol below which rank counts quantisation noise for storage type ``kind`` (0 for floats).

    Measured for Q8_0, Q5_0 and Q4_0; every other format takes the floor of the measured one with as many
    bits or fewer (K-quants and the _1 variants keep finer scales, so this overstates their noise), and
    below 4 bits the Q4_0 floor doubles per bit removed (the quantisation step does). Unknown formats: 1.
    """
    if kind in FLOAT_TYPES:
        return 0.0
    if kind in MEASURED_FLOORS:
        return MEASURED_FLOORS[kind]
    bits = {"Q8": 8, "Q6": 6, "Q5": 5, "Q4": 4, "IQ4": 4, "Q3": 3, "IQ3": 3, "Q2": 2, "IQ2": 2, "IQ1": 1}
    prefix = kind.split("_")[0]
    if prefix not in bits:
        return 1.0
    b = bits[prefix]
    if b >= 8:
        return MEASURED_FLOORS["Q8_0"]
    if b >= 5:
        return MEASURED_FLOORS["Q5_0"]
    return MEASURED_FLOORS["Q4_0"] * 2 ** (4 - b)


def is_gguf(path: Path) -> bool:
    """A file that starts with GGUF's magic bytes (whatever its name)."""
    if not path.is_file():
        return False
    try:
        with path.open("rb") as handle:
            return handle.read(4) == GGUF_MAGIC
    except OSError:
        return False


def undo_rope_permutation(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of llama.cpp's ``permute(w, n_head)``: that converter stores each head's d_head rows
    as (d_head/2, 2) pairs where HF has (2, d_head/2) halves; this puts them back."""
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise UserError(f"a permuted q/k weight has {rows} rows, not a multiple of 2·{n_heads} heads")
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _value(field: Any) -> Any:
    value = field.contents()
    return value.item() if hasattr(value, "item") else value


class GGUFSource(TensorSource):
    """The tensors of one GGUF file, dequantised to float32 on request; see the module docstring."""

    def __init__(self, path: Path, display_name: str | None = None) -> None:
        from gguf import GGUFReader

        self.path = path
        self.name = display_name or str(path)
        self.heads_hint = {}
        try:
            self._reader = GGUFReader(path, "r")
        except (ValueError, OSError, IndexError, KeyError) as exc:
            raise UserError(f"{path} is not a GGUF file the gguf reader understands ({exc})") from None
        fields = self._reader.fields
        arch_field = fields.get("general.architecture")
        self.architecture = str(_value(arch_field)) if arch_field is not None else ""
        self.config: dict[str, Any] = {}
        if self.architecture:
            self.config["model_type"] = _MODEL_TYPES.get(self.architecture, self.architecture)
        for key, hf_key in _CONFIG.items():
            field = fields.get(f"{self.architecture}.{key}")
            if field is not None:
                value = _value(field)
                self.config[hf_key] = int(value) if isinstance(value, int | float) else value
        self._tensors = {t.name: t for t in self._reader.tensors}
        if not self._tensors:
            raise UserError(f"{path} holds no tensors")

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self._tensors[key].shape.tolist()))

    def storage_types(self) -> dict[str, str]:
        """Each tensor's GGUF storage type (``F32``, ``Q8_0``, ``Q4_K``, …)."""
        return {name: t.tensor_type.name for name, t in self._tensors.items()}

    def get(self, key: str) -> torch.Tensor:
        import numpy as np
        from gguf.quants import dequantize

        tensor = self._tensors[key]
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise UserError(
                f"{self.name}: tensor {key} is stored as {tensor.tensor_type.name}: {exc}"
            ) from None
        values = np.ascontiguousarray(values, dtype=np.float32)
        if not values.flags.writeable:  # F32 comes back as a view of the read-only memory map: copy it
            values = values.copy()
        weight = torch.from_numpy(values.reshape(self.shape(key)))
        if self.architecture in PERMUTED_ARCHITECTURES and key.endswith(("attn_q.weight", "attn_k.weight")):
            heads = self.config.get("num_attention_heads")
            if key.endswith("attn_k.weight"):
                heads = self.config.get("num_key_value_heads", heads)
            if not isinstance(heads, int) or heads <= 0:
                raise UserError(f"{self.name} lacks {self.architecture}.attention.head_count to read {key}")
            weight = undo_rope_permutation(weight, heads)
        return weight
