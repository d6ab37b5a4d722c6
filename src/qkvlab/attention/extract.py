"""Per-head factors of every attention layer, from any ``TensorSource``.

For head h with query/key/value rows W_Q^h, W_K^h, W_V^h (each d_head × d_model, as
nn.Linear stores them) and P^h the d_head output-projection columns of that head
(d_model × d_head):

    QK_h = W_K^hᵀ W_Q^h = A Bᵀ,  A = W_K^hᵀ, B = W_Q^hᵀ
    OV_h = P^h W_V^h    = A Bᵀ,  A = P^h,    B = W_V^hᵀ

The attention score of query token i on key token j is x_iᵀ W_Q^hᵀ W_K^h x_j / √d_head
= x_iᵀ QK_hᵀ x_j / √d_head, so QK_h carries the score's bilinear form up to transpose
(same singular values). Biases and the 1/√d_head scale are not part of the products.
With grouped-query attention query head h uses KV group h // (n_heads / n_kv_heads);
the shared W_K and W_V factors are decomposed once per group.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from qkvlab.attention.families import (
    CONFIG_KEYS,
    FAMILIES,
    ROTARY_KEYS,
    Family,
    Layout,
    family_by_model_type,
    family_by_name,
    supported_families_text,
)
from qkvlab.attention.sources import TensorSource
from qkvlab.errors import UserError
from qkvlab.spectra import FactoredProduct, ProductSpectrum

__all__ = ["ArchitectureInfo", "AttentionFactors", "LayerFactors"]


@dataclass(frozen=True)
class ArchitectureInfo:
    family: str
    n_layers: int  # attention layers; with several kinds (T5), the most of any kind
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    #: Layers per kind of attention, for models with several (T5: {"self": 12, "decoder_self": 12,
    #: "cross": 12}); None for the usual one kind, self-attention.
    attention_layers: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """As JSON: ``attention_layers`` only for models with several kinds of attention."""
        out = asdict(self)
        if out["attention_layers"] is None:
            del out["attention_layers"]
        return out


@dataclass(frozen=True)
class LayerFactors:
    layer: int  # counted within its kind of attention
    qk: FactoredProduct
    ov: FactoredProduct
    attention: str = "self"

    def groups(self) -> tuple[FactoredProduct, FactoredProduct] | None:
        """Under grouped-query attention, the products weight decay bounds per KV group, or None (one
        head per group).

        Query heads h₁ … h_r share the group's W_K and W_V. L2 on W_K^g and on every W_Q^h is
        ½(‖A_g‖² + Σ_h‖B_h‖²), which is at least the nuclear norm of the group product
        A_g [B_h₁ … B_h_r]ᵀ = [W_h₁ … W_h_r] (the heads' QK products side by side, d × r·d), with equality
        at balance: that product, not any one head's, is what weight decay turns into a nuclear norm.
        Likewise [P_h₁; …; P_h_r] V_gᵀ for OV (the heads' OV products stacked, r·d × d). docs/spectra.md
        has the argument.
        """
        index = self.qk.left_index
        if index is None:
            return None
        n_groups = self.qk.left.shape[0]
        members = [torch.nonzero(index == g).flatten() for g in range(n_groups)]
        qk = FactoredProduct(
            self.qk.left,  # (G, d, dh): W_K per group
            torch.stack([self.qk.right[m].reshape(-1, self.qk.right.shape[-1]) for m in members]),
        )
        ov = FactoredProduct(
            torch.stack([self.ov.left[m].reshape(-1, self.ov.left.shape[-1]) for m in members]),
            self.ov.right,  # (G, d, dh): W_V per group
        )
        return qk, ov


def natural_key(text: str) -> list[int | str]:
    """Sort key that orders "layer.10" after "layer.9"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _config_value(config: dict, name: str) -> int | None:
    for key in CONFIG_KEYS[name]:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _find_layout(source: TensorSource, family: Family) -> list[tuple[Layout, list[str]]]:
    """The family's first layout whose anchor matches and whose first block has every matrix (OPT and
    LLaMA share the q_proj anchor; only one of them has o_proj); for a family with several kinds of
    attention (T5), every such layout. Empty if none."""
    keys = source.keys()
    keyset = set(keys)
    found = []
    for layout in family.layouts:
        pattern = layout.pattern
        blocks = sorted(
            dict.fromkeys(m["block"] for key in keys if (m := pattern.match(key))), key=natural_key
        )
        templates = [t for t in (layout.q, layout.k, layout.v, layout.qkv, layout.o) if t]
        if blocks and all(t.format(block=blocks[0]) in keyset for t in templates):
            if layout.fused and not _fused_orientation_fits(source, layout, blocks[0]):
                continue  # GPT-2's Conv1D c_attn is (d, 3d); nanoGPT's nn.Linear of the same name is (3d, d)
            found.append((layout, blocks))
            if not family.several_kinds:
                break
    return found


def _reading(found: list[tuple[Layout, list[str]]]) -> tuple:
    """What the spectra depend on in a match: which tensors are q, k, v, o and which way they are stored."""
    return tuple(
        (layout.q, layout.k, layout.v, layout.qkv, layout.o, layout.transposed, layout.qkv_order)
        for layout, _ in found
    )


def _one_reading(
    source: TensorSource, matches: list[tuple[Family, list[tuple[Layout, list[str]]]]]
) -> tuple[Family, list[tuple[Layout, list[str]]]]:
    """The first family whose layout fits, unless families that fit read the weights differently (GPT-2's
    Conv1D and nanoGPT's nn.Linear, both square once split): then a live module's types settle it (a
    ``Conv1D`` is stored (in, out), an ``nn.Linear`` (out, in)); a file cannot, and is refused in one line."""
    readings = {_reading(found) for _, found in matches}
    if len(readings) == 1:
        return matches[0]
    module = getattr(source, "module", None)
    if module is not None:
        modules = dict(module.named_modules())
        settled = []
        for family, found in matches:
            layout, blocks = found[0]
            weight = (layout.qkv or layout.q).format(block=blocks[0])
            kind = type(modules.get(weight.rsplit(".", 1)[0])).__name__
            if (kind == "Conv1D") == layout.transposed and kind in ("Conv1D", "Linear"):
                settled.append((family, found))
        if len({_reading(found) for _, found in settled}) == 1:
            return settled[0]
    names = [family.name for family, _ in matches]
    ways = "; ".join(
        f"{family.name}: {'(in, out) like a Conv1D' if found[0][0].transposed else '(out, in) like nn.Linear'}"
        for family, found in matches
    )
    raise UserError(
        f"{source.name}: its attention weights fit {len(names)} layouts that read them differently ({ways}), and "
        f"nothing in it says which; pass --family {' or --family '.join(names)} (family= in Python)"
    )


def _fused_orientation_fits(source: TensorSource, layout: Layout, block: str) -> bool:
    """Whether a fused q/k/v weight is stored the way ``layout`` says: it has more outputs (q, k and v
    of every head) than inputs (d_model), so (out, in) for nn.Linear and (in, out) for a transposed
    Conv1D."""
    shape = source.shape(layout.qkv.format(block=block))
    if len(shape) != 2 or shape[0] == shape[1]:
        return True  # nothing to tell them apart by; the head-count checks speak later
    out, inp = (shape[1], shape[0]) if layout.transposed else shape
    return out > inp


class AttentionFactors:
    """Architecture detection plus lazy, per-layer access to the factors.

    Args:
        source: where the weights come from (see ``qkvlab.attention.load_source``).
        family: a family name to skip detection.
        n_heads, n_kv_heads: override what the config says (needed for a bare
            ``.safetensors`` of a model whose head count is not stored anywhere).
    """

    def __init__(
        self,
        source: TensorSource,
        *,
        family: str | None = None,
        n_heads: int | None = None,
        n_kv_heads: int | None = None,
    ) -> None:
        self.source = source
        self.family, found = self._detect(family)
        # one (layout, block, index within its kind) per attention layer, kinds in the family's order
        self.units = [(layout, block, i) for layout, blocks in found for i, block in enumerate(blocks)]
        self.layout = found[0][0]
        self.blocks = [block for _, block, _ in self.units]
        self.info = self._architecture(n_heads, n_kv_heads, found)

    # -- detection -------------------------------------------------------------------
    def _detect(self, family_name: str | None) -> tuple[Family, list[tuple[Layout, list[str]]]]:
        source = self.source
        if family_name is not None:
            family = family_by_name(family_name)
            if family is None:
                raise UserError(
                    f"unknown family '{family_name}'; accepted: {', '.join(f.name for f in FAMILIES)}"
                )
            candidates: tuple[Family, ...] = (family,)
        else:
            model_type = source.config.get("model_type")
            by_type = family_by_model_type(model_type) if isinstance(model_type, str) else None
            candidates = (by_type,) if by_type else FAMILIES
        matches = [(family, found) for family in candidates if (found := _find_layout(source, family))]
        if matches:
            return _one_reading(source, matches)
        if family_name is not None:
            raise UserError(
                f"--family {family_name}: {source.name} has no attention block named the way that family names them; "
                f"supported families: {supported_families_text()}"
            )
        if len(candidates) == 1 and family_name is None:  # the config names a family we know
            raise UserError(
                f"{source.name} says model_type '{source.config['model_type']}' ({candidates[0].name} family), but "
                f"its weights lack that family's attention matrices (q, k, v and o of a block); is it complete?"
            )
        what = (
            f"model_type '{source.config['model_type']}'" if "model_type" in source.config else "its weights"
        )
        raise UserError(
            f"unsupported architecture in {source.name} (judged by {what}); "
            f"supported families: {supported_families_text()}"
        )

    def _architecture(
        self, n_heads: int | None, n_kv_heads: int | None, found: list[tuple[Layout, list[str]]]
    ) -> ArchitectureInfo:
        config, layout = self.source.config, self.layout
        first = self.blocks[0]
        for name, given in (("n_heads", n_heads), ("n_kv_heads", n_kv_heads)):
            declared = _config_value(config, name)
            if given is not None and declared is not None and given != declared:
                option = "--n-heads" if name == "n_heads" else "--n-kv-heads"
                raise UserError(
                    f"{option} {given} contradicts the config, which says {declared}; leave {option} out, "
                    "or fix config.json"
                )
        n_heads = n_heads or self.source.heads_hint.get(first) or _config_value(config, "n_heads")
        if not n_heads:
            raise UserError(
                f"cannot tell the number of heads of {self.source.name}: no config with "
                "num_attention_heads and no module attribute num_heads; pass --n-heads (CLI) or n_heads= (Python)"
            )
        n_kv_heads = n_kv_heads or _config_value(config, "n_kv_heads") or n_heads
        if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads:
            raise UserError(
                f"head counts do not divide: n_heads={n_heads} must be a positive multiple of n_kv_heads={n_kv_heads}"
            )
        if layout.fused and layout.qkv_order == "per-head" and n_kv_heads != n_heads:
            raise UserError(
                f"a qkv projection interleaved per head needs n_kv_heads == n_heads, got {n_kv_heads} and {n_heads}"
            )
        q_rows, d_model = self._q_shape(first, n_heads, n_kv_heads)
        if q_rows % n_heads:
            raise UserError(
                f"head counts do not divide: W_Q has {q_rows} output rows, not a multiple of n_heads={n_heads}"
            )
        d_head = _config_value(config, "d_head") or q_rows // n_heads
        if d_head * n_heads != q_rows:
            raise UserError(
                f"head_dim={d_head} × n_heads={n_heads} ≠ {q_rows} rows of W_Q in {self.source.name}"
            )
        if self.family.several_kinds:
            per_kind = {layout.attention: len(blocks) for layout, blocks in found}
            return ArchitectureInfo(
                self.family.name, max(per_kind.values()), n_heads, n_kv_heads, d_model, d_head, per_kind
            )
        n_layers = len(self.blocks)
        declared = _config_value(config, "n_layers")
        if declared is not None and declared != n_layers:
            raise UserError(
                f"{self.source.name} has {n_layers} attention blocks but its config declares {declared} layers; "
                "is a shard missing?"
            )
        return ArchitectureInfo(self.family.name, n_layers, n_heads, n_kv_heads, d_model, d_head)

    def left_out(self) -> list[str]:
        """Lines saying what W_KᵀW_Q and P·W_V leave out for this model: the family's caveat (rotary
        embeddings), and every other parameter inside the attention block (biases, q/k norms, gains)."""
        notes = [f"{self.family.name}: {self.family.caveat}"] if self.family.caveat else []
        others: list[str] = []
        for layout, block, index in self.units:
            if index:
                continue  # the first block of each kind stands for its kind
            used = {
                t.format(block=block)
                for t in (layout.q, layout.k, layout.v, layout.qkv, layout.o, *layout.outside)
                if t
            }
            others += sorted(
                k.removeprefix(block) for k in self._keyset if k.startswith(block) and k not in used
            )
        others = list(dict.fromkeys(others))
        if others:
            notes.append(
                "in each attention block but not in the products (biases, norms and gains between or "
                f"after the factors): {', '.join(others)}"
            )
        return notes

    def _shape(self, key: str) -> tuple[int, ...]:
        if key not in self._keyset:
            raise UserError(
                f"{self.source.name} lacks {key}, which a {self.family.name} attention block needs"
            )
        shape = self.source.shape(key)
        if len(shape) != 2:
            raise UserError(f"{key} in {self.source.name} has shape {shape}; expected a matrix")
        return tuple(reversed(shape)) if self.layout.transposed else shape

    @property
    def _keyset(self) -> set[str]:
        if not hasattr(self, "_keys_cache"):
            self._keys_cache = set(self.source.keys())
        return self._keys_cache

    def _q_shape(self, block: str, n_heads: int, n_kv_heads: int) -> tuple[int, int]:
        """Rows of W_Q (n_heads · d_head) and d_model."""
        layout = self.layout
        if layout.fused:
            rows, cols = self._shape(layout.qkv.format(block=block))
            if rows % (n_heads + 2 * n_kv_heads):
                raise UserError(
                    f"fused qkv weight in {block} has {rows} rows, not a multiple of n_heads + 2·n_kv_heads = "
                    f"{n_heads + 2 * n_kv_heads} (n_heads={n_heads}, n_kv_heads={n_kv_heads})"
                )
            return rows // (n_heads + 2 * n_kv_heads) * n_heads, cols
        rows, cols = self._shape(layout.q.format(block=block))
        return rows, cols

    # -- factors ---------------------------------------------------------------------
    def _matrix(self, template: str, block: str, layout: Layout | None = None) -> torch.Tensor:
        key = template.format(block=block)
        self._shape(key)
        tensor = self.source.get(key)
        return tensor.t() if (layout or self.layout).transposed else tensor

    def _projections(self, block: str, layout: Layout | None = None) -> tuple[torch.Tensor, ...]:
        layout, info = layout or self.layout, self.info
        if layout.fused and layout.qkv_order == "per-head":  # GPT-NeoX: [q_h, k_h, v_h] per head
            w = self._matrix(layout.qkv, block, layout)
            w_q, w_k, w_v = (
                x.reshape(-1, w.shape[1]) for x in w.reshape(info.n_heads, 3, info.d_head, -1).unbind(1)
            )
        elif layout.fused:  # [q; k; v] blocks
            sizes = [info.n_heads * info.d_head, info.n_kv_heads * info.d_head, info.n_kv_heads * info.d_head]
            w_q, w_k, w_v = self._matrix(layout.qkv, block, layout).split(sizes, dim=0)
        else:
            w_q, w_k, w_v = (self._matrix(t, block, layout) for t in (layout.q, layout.k, layout.v))
        w_o = self._matrix(layout.o, block, layout)
        hd, kvd = info.n_heads * info.d_head, info.n_kv_heads * info.d_head
        expected = {"W_Q": (w_q, hd), "W_K": (w_k, kvd), "W_V": (w_v, kvd)}
        for name, (w, rows) in expected.items():
            if w.shape[0] != rows:
                raise UserError(
                    f"{name} in {block or 'the model'} has {w.shape[0]} output rows; expected "
                    f"n_heads·d_head = {rows} (n_heads={info.n_heads}, n_kv_heads={info.n_kv_heads}, "
                    f"d_head={info.d_head})"
                )
        if w_o.shape[1] != hd:
            raise UserError(f"W_O in {block or 'the model'} has {w_o.shape[1]} input columns; expected {hd}")
        return w_q, w_k, w_v, w_o

    def biases(self, index: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The ``index``-th layer's query and key biases as (heads, d_head) and (kv heads, d_head), each None
        where the model has none (fused biases split as the weights are)."""
        layout, block, _ = self.units[index]
        info, keys = self.info, self._keyset
        weights = {layout.q, layout.k, layout.v, layout.qkv, layout.o}
        templates: dict[str, str] = {}
        for role, template in layout.role_templates():
            # torch's bias_k/bias_v are extra key/value rows, not biases of the projections
            if (
                template not in weights
                and role in ("q", "k", "qkv")
                and not template.endswith(("bias_k", "bias_v"))
            ):
                templates.setdefault(role, template)

        def read(role: str) -> torch.Tensor | None:
            key = templates[role].format(block=block) if role in templates else None
            return self.source.get(key) if key in keys else None

        h, g, dh = info.n_heads, info.n_kv_heads, info.d_head
        fused = read("qkv")
        if fused is not None and layout.qkv_order == "per-head":
            b_q, b_k, _ = fused.reshape(h, 3, dh).unbind(1)
        elif fused is not None:
            b_q, b_k, _ = fused.split([h * dh, g * dh, g * dh])
        else:
            b_q, b_k = read("q"), read("k")
        return (
            None if b_q is None else b_q.reshape(h, dh),
            None if b_k is None else b_k.reshape(g, dh),
        )

    def layer(self, index: int) -> LayerFactors:
        """The ``index``-th attention layer (over every kind, in order); its ``layer`` counts within its kind."""
        info = self.info
        layout, block, within = self.units[index]
        w_q, w_k, w_v, w_o = self._projections(block, layout)
        h, g, dh = info.n_heads, info.n_kv_heads, info.d_head

        def per_head(w: torch.Tensor, heads: int) -> torch.Tensor:  # (heads·dh, d) → (heads, d, dh)
            return w.reshape(heads, dh, w.shape[1]).transpose(1, 2)

        group = None if g == h else torch.arange(h) // (h // g)
        p = w_o.reshape(w_o.shape[0], h, dh).permute(1, 0, 2)  # (heads, d_out, dh)
        qk = FactoredProduct(per_head(w_k, g), per_head(w_q, h), left_index=group)
        ov = FactoredProduct(p, per_head(w_v, g), right_index=group)
        return LayerFactors(within, qk, ov, layout.attention)

    def rotary_planes(
        self, layer: LayerFactors, qk: ProductSpectrum | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per KV group and rotary plane, (Σ_h ‖W_Q^h rows of the plane‖², ‖W_K^g rows of the plane‖²), each
        (n_kv_heads, planes) in float64; None for a family without rotary embeddings.

        Rotary embeddings rotate each plane of q and k by an angle that depends on the position, so the
        symmetries of the score that survive them act plane by plane: a rotation within the plane, and a
        scaling of q's plane by c and k's by 1/c. The scaling makes Σ_h‖Q_h^(p)‖² − ‖K_g^(p)‖² conserved
        under gradient flow, and with weight decay λ it decays as e^(−2λt) (docs/spectra.md); nothing ties
        the rest of the plane's 2 × 2 block. The planes follow the family's ``rope`` layout and the
        config's rotary share (``ROTARY_KEYS``). ``qk``, the layer's QK spectrum when already computed,
        supplies the factors' column norms from its QR's R instead of another pass over the weights.
        """
        if not self.family.rope:
            return None
        dh = self.info.d_head
        share = next(
            (float(v) for k in ROTARY_KEYS if isinstance(v := self.source.config.get(k), int | float)), 1.0
        )
        rot = int(dh * share) // 2 * 2
        planes = rot // 2
        if self.family.rope == "half":
            pairs = torch.stack([torch.arange(planes), torch.arange(planes) + planes], dim=1)
        else:  # interleaved
            pairs = torch.arange(rot).reshape(planes, 2)
        if qk is not None and qk.left_columns is not None and qk.right_columns is not None:
            q_sq, k_sq = qk.right_columns, qk.left_columns
        else:
            # (H, dh) and (G, dh): each query and key column's squared norm
            q_sq = layer.qk.right.to(torch.float64).square().sum(1)
            k_sq = layer.qk.left.to(torch.float64).square().sum(1)  # (G, dh)
        index = layer.qk.left_index if layer.qk.left_index is not None else torch.arange(q_sq.shape[0])
        grouped = torch.zeros_like(k_sq).index_add_(0, index, q_sq)  # Σ over each group's heads
        return grouped[:, pairs].sum(-1), k_sq[:, pairs].sum(-1)

    def __iter__(self) -> Iterator[LayerFactors]:
        for index in range(len(self.blocks)):
            yield self.layer(index)

    def __len__(self) -> int:
        return len(self.blocks)
