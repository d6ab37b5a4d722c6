"""Per-head factors of real architectures give the spectra of the products the model computes.

The reference never reuses qkvlab's slicing: it probes each projection module with the
identity (W x = module(e_i) − module(0)), splits heads the way HF does (``view(..., -1,
head_dim)``), forms QK_h = W_K^hᵀ W_Q^h and OV_h = P^h W_V^h explicitly, and takes
``svdvals``. For ``nn.MultiheadAttention`` the check goes through its forward pass.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import qkvlab
from qkvlab.attention import AttentionFactors, LiveSource

from conftest import HF_KINDS, tiny_hf_model

F64 = torch.float64


def _probe(fn, d_in: int) -> torch.Tensor:
    """(d_in, d_out) matrix Mᵀ of the affine map fn(x) = M x + c, read off by probing."""
    with torch.no_grad():
        eye = torch.eye(d_in, dtype=F64)
        return fn(eye) - fn(torch.zeros(1, d_in, dtype=F64))


def _projections(model: nn.Module, kind: str, layer: int, d: int):
    """Callables for q, k, v (input d) and o (input n_heads·d_head) of one layer, HF style."""
    if kind in ("bert", "roberta", "minilm"):
        enc = model.encoder.layer[layer].attention
        return enc.self.query, enc.self.key, enc.self.value, enc.output.dense
    if kind in ("gpt2", "nanogpt"):
        attn = model.transformer.h[layer].attn

        def part(i):
            return lambda x: attn.c_attn(x).split(d, dim=-1)[i]  # GPT-2's (and nanoGPT's) own split

        return part(0), part(1), part(2), attn.c_proj
    if kind == "gpt-neox":  # HF's own split: view(..., H, 3·d_head), then chunk(3)
        attn = model.gpt_neox.layers[layer].attention
        dh = attn.head_size

        def neox(i):
            return lambda x: (
                attn.query_key_value(x).view(*x.shape[:-1], -1, 3 * dh).chunk(3, dim=-1)[i].flatten(-2)
            )

        return neox(0), neox(1), neox(2), attn.dense
    if kind == "phi3":  # HF's own split: q is the first H·d_head outputs, then k, then v
        attn = model.model.layers[layer].self_attn
        q_end = attn.config.num_attention_heads * attn.head_dim
        k_end = q_end + attn.num_key_value_heads * attn.head_dim

        def phi(lo, hi):
            return lambda x: attn.qkv_proj(x)[..., lo:hi]

        return phi(0, q_end), phi(q_end, k_end), phi(k_end, None), attn.o_proj
    if kind == "opt":
        attn = model.model.decoder.layers[layer].self_attn
        return attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj
    if kind == "distilbert":
        attn = model.transformer.layer[layer].attention
        return attn.q_lin, attn.k_lin, attn.v_lin, attn.out_lin
    if kind == "mpnet":  # the model's own modules, as its forward calls them
        attn = model.encoder.layer[layer].attention.attn
        return attn.q, attn.k, attn.v, attn.o
    if kind == "llama":
        attn = model.model.layers[layer].self_attn
    elif kind in ("mistral", "qwen2"):
        attn = model.layers[layer].self_attn
    elif kind == "vit":
        attn = model.layers[layer].attention
    else:
        raise ValueError(kind)
    return attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj


def _reference_products(model, kind, layer, n_heads, n_kv_heads, d_head, d):
    q_fn, k_fn, v_fn, o_fn = _projections(model, kind, layer, d)
    qt = _probe(q_fn, d).reshape(d, n_heads, d_head)  # column block h = W_Q^hᵀ
    kt = _probe(k_fn, d).reshape(d, n_kv_heads, d_head)
    vt = _probe(v_fn, d).reshape(d, n_kv_heads, d_head)
    ot = _probe(o_fn, n_heads * d_head).reshape(n_heads, d_head, -1)  # row block h = P^hᵀ
    rep = n_heads // n_kv_heads
    qk, ov, l2 = [], [], []
    for h in range(n_heads):
        g = h // rep
        qk.append(kt[:, g, :] @ qt[:, h, :].T)
        ov.append(ot[h].T @ vt[:, g, :].T)
        l2.append(0.5 * (kt[:, g, :].square().sum() + qt[:, h, :].square().sum()))
    return torch.stack(qk), torch.stack(ov), torch.stack(l2)


def _check_model_against_reference(model, kind, report):
    arch = report.architecture
    for layer in range(arch.n_layers):
        qk, ov, l2 = _reference_products(
            model, kind, layer, arch.n_heads, arch.n_kv_heads, arch.d_head, arch.d_model
        )
        for product, formed in (("qk", qk), ("ov", ov)):
            recs = report.select(product, layer)
            assert [r["head"] for r in recs] == list(range(arch.n_heads))
            ours = torch.tensor([r["singular_values"] for r in recs], dtype=F64)
            naive = torch.linalg.svdvals(formed)[:, : arch.d_head]
            torch.testing.assert_close(ours, naive, rtol=1e-9, atol=1e-12 * naive.max().item())
        torch.testing.assert_close(
            torch.tensor([r["l2_half"] for r in report.select("qk", layer)], dtype=F64), l2
        )


EXPECTED = {
    "bert": ("bert", 6, 6, 8),
    "roberta": ("bert", 6, 6, 8),
    "gpt2": ("gpt2", 6, 6, 8),
    "llama": ("llama", 6, 2, 12),
    "mistral": ("llama", 6, 3, 8),
    "qwen2": ("llama", 6, 2, 8),
    "vit": ("vit", 6, 6, 8),
    "gpt-neox": ("gpt-neox", 6, 6, 8),
    "opt": ("opt", 6, 6, 8),
    "phi3": ("phi3", 6, 2, 8),
    "distilbert": ("distilbert", 6, 6, 8),
    "mpnet": ("mpnet", 6, 6, 8),
}


@pytest.mark.parametrize("kind", HF_KINDS)
def test_hf_family_spectra_equal_formed_products(kind: str) -> None:
    model = tiny_hf_model(kind).double()
    report = qkvlab.inspect(model)
    family, n_heads, n_kv_heads, d_head = EXPECTED[kind]
    arch = report.architecture
    assert (arch.family, arch.n_layers, arch.n_heads, arch.n_kv_heads, arch.d_head, arch.d_model) == (
        family,
        3,
        n_heads,
        n_kv_heads,
        d_head,
        48,
    )
    assert len(report.heads) == 3 * 2 * n_heads
    _check_model_against_reference(model, kind, report)


class _NanoAttention(nn.Module):
    """nanoGPT's CausalSelfAttention, as far as its weights go: c_attn and c_proj are nn.Linear."""

    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.n_head = n_head


class _NanoBlock(nn.Module):
    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = _NanoAttention(d, n_head)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(d, 4 * d), "c_proj": nn.Linear(4 * d, d)})


class _NanoGPT(nn.Module):
    """nanoGPT's module tree and names (transformer.wte, transformer.h.N.attn.c_attn, …)."""

    def __init__(self, d: int = 48, n_head: int = 6, n_layer: int = 3) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(
            {"wte": nn.Embedding(65, d), "h": nn.ModuleList(_NanoBlock(d, n_head) for _ in range(n_layer))}
        )


@pytest.mark.parametrize("split", [False, True])
def test_nanogpt_is_told_from_gpt2_by_shape_and_inspected_exactly(split, tmp_path) -> None:
    """nanoGPT names its attention like GPT-2 but stores c_attn as nn.Linear (3d, d), not Conv1D (d, 3d)."""
    from safetensors.torch import save_file

    from qkvlab.attention.split import split_fused_qkv

    torch.manual_seed(0)
    model = _NanoGPT().double()
    if split:
        split_fused_qkv(model)
    report = qkvlab.inspect(model, n_heads=6)
    arch = report.architecture
    assert (arch.family, arch.n_layers, arch.n_heads, arch.d_head, arch.d_model) == ("nanogpt", 3, 6, 8, 48)
    _check_model_against_reference(model, "nanogpt", report)
    # the same weights as a bare safetensors file with the head count given
    path = tmp_path / "nano.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    from_file = qkvlab.inspect(path, n_heads=6)
    assert from_file.architecture.family == "nanogpt"
    torch.testing.assert_close(
        torch.tensor([r["singular_values"] for r in from_file.heads]),
        torch.tensor([r["singular_values"] for r in report.heads]),
    )
    # and GPT-2 itself is still GPT-2
    assert qkvlab.inspect(tiny_hf_model("gpt2")).architecture.family == "gpt2"


def test_split_nanogpt_weights_are_split_by_rows_and_a_file_that_cannot_say_its_layout_is_refused(
    tmp_path,
) -> None:
    """Split, nanoGPT's c_attn parts and GPT-2's are all square: a file without a config cannot tell an
    nn.Linear (out, in) from a Conv1D (in, out). It is refused in one line naming the option that settles it."""
    from safetensors.torch import save_file

    from qkvlab.attention.split import fuse_state_dict, split_state_dict

    torch.manual_seed(0)
    model = _NanoGPT().double()
    fused = model.state_dict()
    split = split_state_dict(fused)
    w = fused["transformer.h.0.attn.c_attn.weight"]  # (3d, d): q, k, v are row blocks
    assert torch.equal(split["transformer.h.0.attn.c_attn.k.weight"], w[48:96])
    assert torch.equal(
        split["transformer.h.0.attn.c_attn.v.bias"], fused["transformer.h.0.attn.c_attn.bias"][96:]
    )
    back = fuse_state_dict(split, conv1d=False)
    assert set(back) == set(fused) and all(torch.equal(back[k], fused[k]) for k in fused)
    path = tmp_path / "split.safetensors"
    save_file({k: v.contiguous() for k, v in split.items()}, str(path))
    with pytest.raises(qkvlab.UserError, match=r"--family gpt2 or --family nanogpt") as error:
        qkvlab.inspect(path, n_heads=6)
    assert "\n" not in str(error.value)
    settled = qkvlab.inspect(path, n_heads=6, family="nanogpt")
    torch.testing.assert_close(
        torch.tensor([r["singular_values"] for r in settled.heads]),
        torch.tensor([r["singular_values"] for r in qkvlab.inspect(model, n_heads=6).heads]),
    )
    from qkvlab.cli import main

    assert main(["inspect", str(path), "--n-heads", "6"]) == 2


def test_every_head_of_real_minilm(minilm_path) -> None:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_path).double().eval()
    report = qkvlab.inspect(model)
    assert report.architecture.to_dict() == {
        "family": "bert",
        "n_layers": 6,
        "n_heads": 12,
        "n_kv_heads": 12,
        "d_model": 384,
        "d_head": 32,
    }
    _check_model_against_reference(model, "minilm", report)


def test_gqa_decomposes_each_shared_factor_once(monkeypatch) -> None:
    model = tiny_hf_model("llama")
    factors = AttentionFactors(LiveSource(model))
    layer = factors.layer(0)
    assert layer.qk.left.shape == (2, 48, 12)  # 2 K groups, not 6 expanded copies
    assert layer.qk.right.shape == (6, 48, 12)
    assert layer.ov.right.shape == (2, 48, 12)  # 2 V groups
    assert layer.qk.left_index.tolist() == [0, 0, 0, 1, 1, 1]

    calls = []
    real_qr = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda x, mode: calls.append(x.shape[0]) or real_qr(x, mode=mode))
    layer.qk.spectrum()
    assert sorted(calls) == [2, 6]


@pytest.mark.parametrize("kdim", [None, 20])
def test_torch_multihead_attention_through_its_forward(kdim) -> None:
    """The factors reproduce nn.MultiheadAttention's own attention weights and output."""
    torch.manual_seed(0)
    d, heads, seq = 24, 4, 7
    mha = nn.MultiheadAttention(d, heads, bias=False, kdim=kdim, vdim=kdim, batch_first=True).double().eval()
    x = torch.randn(1, seq, d, dtype=F64)
    kv = x if kdim is None else torch.randn(1, seq, kdim, dtype=F64)
    with torch.no_grad():
        out, weights = mha(x, kv, kv, need_weights=True, average_attn_weights=False)

    factors = AttentionFactors(LiveSource(mha))
    assert factors.family.name == "torch-mha"
    assert factors.info.n_heads == heads and factors.info.d_head == d // heads
    layer = factors.layer(0)
    qk, ov = layer.qk.full(), layer.ov.full()  # (heads, d_k, d), (heads, d, d_v)
    # score_ij = q_iᵀ k_j / √d_head = x_iᵀ W_Q^hᵀ W_K^h kv_j / √d_head = kv_jᵀ QK_h x_i / √d_head
    scores = torch.einsum("jk,hki,il->hlj", kv[0], qk, x[0].T) / math.sqrt(d // heads)
    torch.testing.assert_close(torch.softmax(scores, -1), weights[0])
    # out_i = Σ_h Σ_j a^h_ij P^h W_V^h kv_j = Σ_h Σ_j a^h_ij OV_h kv_j
    expected = torch.einsum("hij,hdv,jv->id", weights[0], ov, kv[0])
    torch.testing.assert_close(expected, out[0])

    report = qkvlab.inspect(mha)
    naive = torch.linalg.svdvals(qk)[:, : d // heads]
    ours = torch.tensor([r["singular_values"] for r in report.select("qk", 0)], dtype=F64)
    torch.testing.assert_close(ours, naive)


def test_torch_transformer_encoder_layers_are_found_in_order() -> None:
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=12, enable_nested_tensor=False)
    report = qkvlab.inspect(encoder)
    assert report.architecture.family == "torch-mha"
    assert report.architecture.n_layers == 12
    for i in (0, 2, 11):  # natural order: layer 2 is layers.2, not layers.10
        w = encoder.layers[i].self_attn.in_proj_weight.detach().double()
        q, k = w[:8], w[32:40]  # head 0
        expected = torch.linalg.svdvals(k.T @ q)[:8]
        got = torch.tensor(report.select("qk", i)[0]["singular_values"], dtype=F64)
        torch.testing.assert_close(got, expected)


def test_timm_style_fused_qkv_follows_its_reshape_convention() -> None:
    """timm's Attention: qkv(x).reshape(B, N, 3, H, d_head); our table must agree."""

    class Attention(nn.Module):
        def __init__(self, d: int, heads: int) -> None:
            super().__init__()
            self.num_heads, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

        def qkv_heads(self, x: torch.Tensor) -> torch.Tensor:
            b, n, d = x.shape
            return self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = Attention(16, 2)

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.Sequential(Block(), Block())

    torch.manual_seed(2)
    model = Tiny().double()
    report = qkvlab.inspect(model)
    assert report.architecture.family == "timm-vit"
    eye = torch.eye(16, dtype=F64)[None]
    zero = torch.zeros(1, 1, 16, dtype=F64)
    with torch.no_grad():
        probe = model.blocks[1].attn.qkv_heads(eye) - model.blocks[1].attn.qkv_heads(zero)  # (3,1,H,16,dh)
    q, k = probe[0, 0], probe[1, 0]  # (H, d, d_head): W_Q^hᵀ, W_K^hᵀ
    for h in range(2):
        expected = torch.linalg.svdvals(k[h] @ q[h].T)[:8]
        got = torch.tensor(report.select("qk", 1)[h]["singular_values"], dtype=F64)
        torch.testing.assert_close(got, expected)


def test_peft_free_unknown_module_is_rejected_with_supported_list() -> None:
    with pytest.raises(qkvlab.UserError, match="supported families: bert"):
        qkvlab.inspect(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


def test_opt_weights_without_a_config_are_not_mistaken_for_llama(tmp_path) -> None:
    """OPT and LLaMA both name q_proj; only OPT has out_proj. A bare checkpoint (no config.json) is
    detected by its weights."""
    model = tiny_hf_model("opt")
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    report = qkvlab.inspect(tmp_path, n_heads=6)
    assert report.architecture.family == "opt"
    _check_model_against_reference(model.double(), "opt", report)


def test_t5_three_kinds_of_attention_equal_formed_products(tmp_path) -> None:
    """T5: encoder self-, decoder self- and cross-attention, each head record with its `attention`, d_head
    = d_kv, layers counted within each kind; checked against products formed from HF's own modules."""
    import json

    import transformers as tf

    from qkvlab.cli import main
    from qkvlab.inspection import InspectReport

    torch.manual_seed(0)
    config = tf.T5Config(
        vocab_size=64, d_model=32, d_kv=6, num_heads=4, num_layers=2, num_decoder_layers=3, d_ff=48
    )
    model = tf.T5Model(config).double().eval()
    report = qkvlab.inspect(model)
    arch = report.architecture
    assert arch.family == "t5" and arch.d_head == 6 and arch.n_heads == 4
    assert arch.attention_layers == {"self": 2, "decoder_self": 3, "cross": 3}
    assert report.attention_kinds() == ["self", "decoder_self", "cross"]
    modules = {
        "self": [b.layer[0].SelfAttention for b in model.encoder.block],
        "decoder_self": [b.layer[0].SelfAttention for b in model.decoder.block],
        "cross": [b.layer[1].EncDecAttention for b in model.decoder.block],
    }
    for kind, attns in modules.items():
        for layer, attn in enumerate(attns):
            qt = _probe(attn.q, 32).reshape(32, 4, 6)
            kt = _probe(attn.k, 32).reshape(32, 4, 6)
            vt = _probe(attn.v, 32).reshape(32, 4, 6)
            ot = _probe(attn.o, 24).reshape(4, 6, 32)
            for product, formed in (
                ("qk", torch.stack([kt[:, h] @ qt[:, h].T for h in range(4)])),
                ("ov", torch.stack([ot[h].T @ vt[:, h].T for h in range(4)])),
            ):
                recs = report.select(product, layer, attention=kind)
                assert [r["attention"] for r in recs] == [kind] * 4
                ours = torch.tensor([r["singular_values"] for r in recs], dtype=F64)
                torch.testing.assert_close(ours, torch.linalg.svdvals(formed)[:, :6], rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="give attention= with layer="):
        report.select("qk", 0)
    # streamed from disk: the same; the JSON is schema 2, and a schema-1 file still reads
    model.float().save_pretrained(tmp_path / "t5")
    assert main(["inspect", str(tmp_path / "t5"), "--quiet", "--json", str(tmp_path / "t5.json")]) == 0
    data = json.loads((tmp_path / "t5.json").read_text())
    assert data["schema_version"] == 3 and {r["attention"] for r in data["heads"]} == set(modules)
    assert any("1/√d_kv" in n for n in data["notes"])
    old = {
        **data,
        "schema_version": 1,
        "heads": [
            {k: v for k, v in r.items() if k != "attention"}
            for r in data["heads"]
            if r["attention"] == "self"
        ],
    }
    assert InspectReport.from_dict(old).attention_kinds() == ["self"]
    rows = report.layer_summary()
    assert [(r["attention"], r["layer"]) for r in rows] == [
        ("self", 0),
        ("self", 1),
        ("decoder_self", 0),
        ("decoder_self", 1),
        ("decoder_self", 2),
        ("cross", 0),
        ("cross", 1),
        ("cross", 2),
    ]
    from qkvlab.inspection import summary_metrics

    assert "spectra/cross/L2/qk_erank_mean" in summary_metrics(report)
    assert "spectra/L1/qk_erank_mean" in summary_metrics(
        report
    )  # encoder self-attention keeps the plain tags


def test_t5_in_the_terminal_plots_and_report(tmp_path, capsys) -> None:
    from qkvlab.cli import main

    tiny_hf_model("t5").save_pretrained(tmp_path / "t5")
    capsys.readouterr()
    json_path, plots = tmp_path / "t5.json", tmp_path / "plots"
    assert main(["inspect", str(tmp_path / "t5"), "--json", str(json_path), "--plot", str(plots)]) == 0
    out = capsys.readouterr().out
    assert "3 encoder self-attention layers, 3 decoder self-attention layers, 3 cross-attention layers" in out
    assert out.count("layer  QK erank") == 3 and "cross-attention (decoder queries" in out
    assert {p.name for p in plots.iterdir()} == {"self", "decoder_self", "cross"}
    assert main(["report", str(json_path), "--out", str(tmp_path / "page")]) == 0
    page = (tmp_path / "page" / "report.md").read_text()
    assert "t5, cross" in page and "t5, decoder_self" in page


def test_torch_checkpoints_are_read_through_the_restricted_loader(tmp_path) -> None:
    """nanoGPT's ckpt.pt (with torch.compile's `_orig_mod.` prefixes and its `model_args`) and a HF folder
    holding pytorch_model.bin (one file, and sharded) give the spectra of the live model, exactly."""
    torch.manual_seed(1)
    nano = _NanoGPT().double()
    args = {"n_layer": 3, "n_head": 6, "n_embd": 48, "block_size": 64, "bias": True, "vocab_size": 65}
    compiled = {f"_orig_mod.{k}": v for k, v in nano.state_dict().items()}
    torch.save(
        {"model": compiled, "model_args": args, "iter_num": 10, "best_val_loss": torch.tensor(1.5)},
        tmp_path / "ckpt.pt",
    )
    from_ckpt = qkvlab.inspect(tmp_path / "ckpt.pt")  # the head count from model_args
    assert from_ckpt.architecture.family == "nanogpt" and from_ckpt.architecture.n_heads == 6
    _check_model_against_reference(nano, "nanogpt", from_ckpt)

    bert = tiny_hf_model("bert").double()
    single = tmp_path / "bert"
    single.mkdir()
    bert.config.to_json_file(single / "config.json")
    torch.save(
        bert.state_dict(), single / "pytorch_model.bin", _use_new_zipfile_serialization=False
    )  # legacy
    sharded = tmp_path / "bert-sharded"
    sharded.mkdir()
    bert.config.to_json_file(sharded / "config.json")
    state = bert.state_dict()
    names = sorted(state)
    parts = {
        "pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
        "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :],
    }
    for file, keys in parts.items():
        torch.save({k: state[k] for k in keys}, sharded / file)
    index = {"weight_map": {k: file for file, keys in parts.items() for k in keys}}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    for folder in (single, sharded):
        report = qkvlab.inspect(folder)
        assert report.architecture.family == "bert"
        _check_model_against_reference(bert, "bert", report)
