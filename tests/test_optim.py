"""Roles, parameter groups, presets, the L2 penalty and fused-projection splitting."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from torch import nn

import qkvlab
from qkvlab.optim import l2_penalty, param_groups, parse_preset, preset_settings, roles

from conftest import tiny_bert_classifier, tiny_hf_model

LR, WD = 1e-3, 0.1


def _tiny_bert_classifier(seed: int = 0) -> nn.Module:
    return tiny_bert_classifier(seed, num_labels=3)


def _group_of(groups, name):
    for group in groups:
        if name in group["param_names"]:
            return group
    raise AssertionError(f"{name} is in no group")


# -- roles -----------------------------------------------------------------------------------


def test_roles_bert_classifier() -> None:
    r = roles(_tiny_bert_classifier())
    layer = "bert.encoder.layer.1."
    assert r[layer + "attention.self.query.weight"] == "q"
    assert r[layer + "attention.self.query.bias"] == "q"
    assert r[layer + "attention.self.key.bias"] == "k"
    assert r[layer + "attention.self.value.weight"] == "v"
    assert r[layer + "attention.output.dense.weight"] == "o"
    assert r[layer + "attention.output.LayerNorm.weight"] == "norm"
    assert r[layer + "intermediate.dense.weight"] == "mlp"
    assert r[layer + "output.dense.weight"] == "mlp"  # the FFN output, not the attention output
    assert r["bert.embeddings.word_embeddings.weight"] == "embed"
    assert r["bert.embeddings.LayerNorm.bias"] == "norm"
    assert r["bert.pooler.dense.weight"] == "other"
    assert r["classifier.weight"] == "head" and r["classifier.bias"] == "head"


def test_roles_gpt2_llama_vit() -> None:
    gpt2 = roles(tiny_hf_model("gpt2"))
    assert gpt2["transformer.h.0.attn.c_attn.weight"] == "qkv"
    assert gpt2["transformer.h.0.attn.c_attn.bias"] == "qkv"
    assert gpt2["transformer.h.0.attn.c_proj.weight"] == "o"
    assert gpt2["transformer.h.0.mlp.c_proj.weight"] == "mlp"
    assert gpt2["transformer.h.0.ln_1.weight"] == "norm" and gpt2["transformer.ln_f.bias"] == "norm"
    assert gpt2["transformer.wte.weight"] == "embed" and gpt2["transformer.wpe.weight"] == "embed"
    assert "lm_head.weight" not in gpt2  # tied to wte: one parameter, one role

    llama = roles(tiny_hf_model("llama"))
    assert [llama[f"model.layers.2.self_attn.{m}_proj.weight"] for m in "qkvo"] == ["q", "k", "v", "o"]
    assert llama["model.layers.2.mlp.gate_proj.weight"] == "mlp"
    assert llama["model.layers.2.input_layernorm.weight"] == "norm"
    assert llama["model.embed_tokens.weight"] == "embed"
    assert llama["lm_head.weight"] == "head"  # untied

    vit = roles(tiny_hf_model("vit"))
    assert vit["layers.0.attention.q_proj.bias"] == "q"
    assert vit["embeddings.cls_token"] == "embed"
    assert vit["embeddings.position_embeddings"] == "embed"
    assert vit["embeddings.patch_embeddings.projection.weight"] == "embed"
    assert vit["layers.0.layernorm_before.weight"] == "norm"


def test_roles_multihead_attention_and_split() -> None:
    encoder = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 4, 32), num_layers=2, enable_nested_tensor=False
    )
    r = roles(encoder)
    assert r["layers.0.self_attn.in_proj_weight"] == "qkv"
    assert r["layers.0.self_attn.in_proj_bias"] == "qkv"
    assert r["layers.0.self_attn.out_proj.weight"] == "o"
    assert r["layers.0.linear1.weight"] == "mlp"
    assert r["layers.0.norm1.weight"] == "norm"
    qkvlab.split_fused_qkv(encoder)
    r = roles(encoder)
    assert [r[f"layers.1.self_attn.{m}_proj_weight"] for m in "qkv"] == ["q", "k", "v"]
    assert [r[f"layers.1.self_attn.{m}_bias"] for m in "qkv"] == ["q", "k", "v"]
    assert "qkv" not in r.values()


def test_roles_of_peft_lora_model() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_bert_classifier(), LoraConfig(r=4, target_modules=["query", "value"]))
    r = roles(model)
    base = "base_model.model.bert.encoder.layer.0.attention.self."
    assert r[base + "query.lora_A.default.weight"] == "q"
    assert r[base + "query.lora_B.default.weight"] == "q"
    assert r[base + "query.base_layer.weight"] == "q"
    assert r[base + "value.lora_B.default.weight"] == "v"
    assert r[base + "key.weight"] == "k"


# -- groups ----------------------------------------------------------------------------------


def test_default_groups_follow_hf_trainer_decay_convention() -> None:
    model = _tiny_bert_classifier()
    groups = param_groups(model, lr=LR, weight_decay=WD)
    assert all(set(g) >= {"params", "param_names", "role", "lr", "weight_decay"} for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    names = [n for g in groups for n in g["param_names"]]
    assert len(names) == len(set(names))
    assert _group_of(groups, "bert.encoder.layer.0.attention.self.query.weight")["weight_decay"] == WD
    assert _group_of(groups, "bert.encoder.layer.0.attention.self.query.bias")["weight_decay"] == 0.0
    assert _group_of(groups, "bert.encoder.layer.0.output.LayerNorm.weight")["weight_decay"] == 0.0
    assert (
        _group_of(groups, "bert.embeddings.word_embeddings.weight")["weight_decay"] == WD
    )  # like HF Trainer
    assert {g["lr"] for g in groups} == {LR}
    torch.optim.AdamW(groups)  # accepted as is


def test_authors_bug_cases_get_the_right_answer() -> None:
    """Paper 001's code sent every 1-D parameter to the V group, put the classifier in "K",
    and decayed q/k biases. With qv-ratio (λ = 8):"""
    model = _tiny_bert_classifier()
    groups = param_groups(model, lr=LR, weight_decay=WD, **preset_settings("qv-ratio", ratio=8))
    q_bias = _group_of(groups, "bert.encoder.layer.0.attention.self.query.bias")
    assert q_bias["lr"] == LR  # q's rate, not v's
    assert _group_of(groups, "bert.encoder.layer.0.attention.self.value.bias")["lr"] == pytest.approx(8 * LR)
    assert _group_of(groups, "bert.encoder.layer.0.attention.self.value.weight")["lr"] == pytest.approx(
        8 * LR
    )
    assert _group_of(groups, "classifier.weight")["lr"] == LR  # the base rate
    assert q_bias["weight_decay"] == 0.0
    assert _group_of(groups, "bert.encoder.layer.1.attention.self.query.weight")["weight_decay"] == WD
    # k is frozen (not in any group); its bias is not decayed either way
    assert not any("key" in n for g in groups for n in g["param_names"])
    k_bias = dict(model.named_parameters())["bert.encoder.layer.0.attention.self.key.bias"]
    assert not k_bias.requires_grad


def test_overrides_and_decoupled_attention_preset() -> None:
    model = tiny_hf_model("llama")
    groups = param_groups(
        model,
        lr=LR,
        weight_decay=WD,
        **preset_settings("decoupled-attn", attn_weight_decay=0.01, attn_lr_scale=0.5),
    )
    for m in "qkvo":
        g = _group_of(groups, f"model.layers.0.self_attn.{m}_proj.weight")
        assert (g["role"], g["lr"], g["weight_decay"]) == (m, 0.5 * LR, 0.01)
    mlp = _group_of(groups, "model.layers.0.mlp.up_proj.weight")
    assert (mlp["lr"], mlp["weight_decay"]) == (LR, WD)

    groups = param_groups(model, lr=LR, weight_decay=WD, overrides={"embed": {"weight_decay": 0.0}})
    assert _group_of(groups, "model.embed_tokens.weight")["weight_decay"] == 0.0


def test_lora_plus_ratio_on_peft_model() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        _tiny_bert_classifier(), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    groups = param_groups(model, lr=LR, weight_decay=WD, lora_ratio=16, overrides={"v": {"lr_scale": 4}})
    base = "base_model.model.bert.encoder.layer.1.attention.self."
    assert _group_of(groups, base + "query.lora_A.default.weight")["lr"] == LR
    assert _group_of(groups, base + "query.lora_B.default.weight")["lr"] == pytest.approx(16 * LR)
    assert _group_of(groups, base + "value.lora_A.default.weight")["lr"] == pytest.approx(4 * LR)
    assert _group_of(groups, base + "value.lora_B.default.weight")["lr"] == pytest.approx(64 * LR)
    # the trainable classifier copy (PEFT modules_to_save) keeps the base rate, its bias is not boosted
    head = [n for g in groups for n in g["param_names"] if "classifier" in n]
    assert head and all(_group_of(groups, n)["lr"] == LR for n in head)
    # frozen base weights stay out, adapters only where PEFT put them
    names = {n for g in groups for n in g["param_names"]}
    assert not any("base_layer" in n or "original_module" in n for n in names)
    assert not any("key" in n for n in names)
    assert {g["role"] for g in groups if "lora" in "".join(g["param_names"])} == {"q", "v"}


def test_train_set_freezes_everything_else_and_keeps_the_head() -> None:
    model = _tiny_bert_classifier()
    groups = param_groups(model, lr=LR, weight_decay=WD, train={"o"})
    assert {g["role"] for g in groups} == {"o", "head"}
    assert all(
        p.requires_grad == (r in ("o", "head"))
        for (n, p), r in zip(model.named_parameters(), roles(model).values(), strict=True)
    )
    groups = param_groups(model, lr=LR, weight_decay=WD, train="o,-head")
    assert {g["role"] for g in groups} == {"o"}
    assert not dict(model.named_parameters())["classifier.weight"].requires_grad


def test_qv_ratio_training_moves_only_q_v_and_head() -> None:
    model = _tiny_bert_classifier()
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.AdamW(
        param_groups(model, lr=1e-2, weight_decay=0.1, **preset_settings("qv-ratio"))
    )
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, 64, (4, 10), generator=gen)
        loss = model(input_ids=ids, labels=torch.randint(0, 3, (4,), generator=gen)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    r = roles(model)
    for name, role in r.items():
        moved = not torch.equal(before[name], after[name])
        if role in ("q", "v", "head"):
            assert moved, name
        else:
            assert not moved, f"{name} ({role}) changed"


def test_errors_are_clear() -> None:
    model = _tiny_bert_classifier()
    with pytest.raises(qkvlab.UserError, match="unknown role query in overrides; accepted: q, k, v"):
        param_groups(model, lr=LR, weight_decay=WD, overrides={"query": {"lr_scale": 2}})
    with pytest.raises(qkvlab.UserError, match="unknown role attn in train"):
        param_groups(model, lr=LR, weight_decay=WD, train={"q", "attn"})
    with pytest.raises(
        qkvlab.UserError, match="unknown setting lr for role q; accepted: lr_scale, weight_decay"
    ):
        param_groups(model, lr=LR, weight_decay=WD, overrides={"q": {"lr": 2}})
    with pytest.raises(qkvlab.UserError, match="leaves nothing trainable"):
        param_groups(model, lr=LR, weight_decay=WD, train={"qkv", "-head"})
    with pytest.raises(qkvlab.UserError, match="lr_scale'\\] = 0; accepted: a number > 0"):
        param_groups(model, lr=LR, weight_decay=WD, overrides={"v": {"lr_scale": 0}})
    with pytest.raises(
        qkvlab.UserError, match="unknown preset 'qv'; accepted: decoupled-attn, qv-ratio, loraplus"
    ):
        preset_settings("qv")
    with pytest.raises(qkvlab.UserError, match="no argument lam; accepted: ratio"):
        parse_preset("qv-ratio:lam=2")
    assert parse_preset("qv-ratio:ratio=8")["overrides"] == {"v": {"lr_scale": 8.0}}


def test_fused_qkv_needs_a_split_for_different_settings() -> None:
    model = tiny_hf_model("gpt2")
    with pytest.raises(
        qkvlab.UserError,
        match=r"share the fused tensor transformer\.h\.0\.attn\.c_attn\.weight.*split_fused_qkv",
    ):
        param_groups(model, lr=LR, weight_decay=WD, overrides={"v": {"lr_scale": 4}})
    with pytest.raises(qkvlab.UserError, match=r"splits q/k/v.*split_fused_qkv"):
        param_groups(model, lr=LR, weight_decay=WD, train={"q", "v"})
    # the same setting for all three is fine on the fused tensor
    same = {r: {"weight_decay": 0.0} for r in "qkv"}
    groups = param_groups(model, lr=LR, weight_decay=WD, overrides=same)
    assert _group_of(groups, "transformer.h.0.attn.c_attn.weight")["weight_decay"] == 0.0
    qkvlab.split_fused_qkv(model)
    groups = param_groups(model, lr=LR, weight_decay=WD, overrides={"v": {"lr_scale": 4}})
    assert _group_of(groups, "transformer.h.0.attn.c_attn.v.weight")["lr"] == pytest.approx(4 * LR)
    assert _group_of(groups, "transformer.h.0.attn.c_attn.q.weight")["lr"] == LR


# -- coupled L2 vs decoupled ------------------------------------------------------------------


def test_sgd_step_with_l2_penalty_equals_sgd_weight_decay() -> None:
    lam = 0.3
    a, b = _tiny_bert_classifier(1), _tiny_bert_classifier(1)
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 0])
    for m in (a, b):
        m.eval()  # no dropout: both see the same function

    coupled = param_groups(a, lr=0.1, weight_decay=lam, regularization="l2")
    assert all(g["weight_decay"] == 0.0 for g in coupled)
    opt_a = torch.optim.SGD(coupled, lr=0.1)
    (a(input_ids=ids, labels=labels).loss + l2_penalty(coupled)).backward()
    opt_a.step()

    decoupled = param_groups(b, lr=0.1, weight_decay=lam)
    opt_b = torch.optim.SGD(decoupled, lr=0.1)  # SGD's weight_decay adds λθ to the gradient
    b(input_ids=ids, labels=labels).loss.backward()
    opt_b.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7, msg=name)


def test_l2_penalty_value() -> None:
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    groups = [
        {"params": [w], "l2": 0.5, "weight_decay": 0.0},
        {"params": [nn.Parameter(torch.ones(3))], "weight_decay": 0.0},
    ]
    assert l2_penalty(groups).item() == pytest.approx(0.25 * 25)


# -- splitting fused projections -------------------------------------------------------------


def test_split_gpt2_keeps_outputs_and_round_trips() -> None:
    model = tiny_hf_model("gpt2")
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
    fused_state = copy.deepcopy(model.state_dict())
    spectra_before = qkvlab.inspect(model).heads
    assert qkvlab.split_fused_qkv(model) == [f"transformer.h.{i}.attn.c_attn" for i in range(3)]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference, rtol=1e-6, atol=1e-6)
    split_params = {k: v.detach() for k, v in model.named_parameters()}
    assert split_params["transformer.h.0.attn.c_attn.q.weight"].shape == (48, 48)
    # the split model's state dict is the original architecture's (what save_pretrained writes)
    saved = model.state_dict()
    assert set(saved) == set(fused_state) and all(torch.equal(saved[k], fused_state[k]) for k in saved)
    # state dicts convert both ways without a model
    converted = qkvlab.split_state_dict(fused_state)
    assert set(split_params) <= set(converted)
    assert all(torch.equal(converted[k], split_params[k]) for k in split_params)
    back = qkvlab.fuse_state_dict(converted)
    assert set(back) == set(fused_state) and all(torch.equal(back[k], fused_state[k]) for k in back)
    # the spectra are those of the same products
    after = qkvlab.inspect(model).heads
    for x, y in zip(spectra_before, after, strict=True):
        assert x["singular_values"] == pytest.approx(y["singular_values"], rel=1e-12)
    qkvlab.fuse_split_qkv(model)
    assert all(torch.equal(model.state_dict()[k], fused_state[k]) for k in fused_state)


def test_split_timm_style_qkv_linear() -> None:
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.num_heads, self.qkv, self.proj = 2, nn.Linear(8, 24), nn.Linear(8, 8)

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
            out = torch.softmax(q @ k.transpose(-1, -2) / 2, -1) @ v
            return self.proj(out.transpose(1, 2).reshape(b, n, 8))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = Attn()

        def forward(self, x):
            return x + self.attn(x)

    model = nn.Module()
    model.blocks = nn.Sequential(Block(), Block())
    x = torch.randn(2, 5, 8)
    reference = model.blocks(x)
    state = copy.deepcopy(model.state_dict())
    qkvlab.split_fused_qkv(model)
    torch.testing.assert_close(model.blocks(x), reference, rtol=1e-6, atol=1e-6)
    assert roles(model)["blocks.1.attn.qkv.k.bias"] == "k"
    converted = qkvlab.split_state_dict(state)
    assert all(torch.equal(converted[k], v.detach()) for k, v in model.named_parameters())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())  # saves as the original


def test_split_gpt2_saves_and_reloads_as_gpt2(tmp_path) -> None:
    import transformers as tf

    model = tiny_hf_model("gpt2")
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    qkvlab.split_fused_qkv(model)
    with torch.no_grad():  # train the split model a little so the reload has something to get right
        for name, param in model.named_parameters():
            if ".c_attn.q." in name:
                param.add_(0.01)
        reference = model(ids).logits
    model.save_pretrained(tmp_path / "split-gpt2")
    reloaded = tf.GPT2LMHeadModel.from_pretrained(tmp_path / "split-gpt2", use_safetensors=True)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, reference, rtol=1e-6, atol=1e-6)
    # and a split model loads an ordinary checkpoint (a Trainer resuming a split model)
    again = tiny_hf_model("gpt2")
    qkvlab.split_fused_qkv(again)
    missing, unexpected = again.load_state_dict(reloaded.state_dict(), strict=True)
    assert not missing and not unexpected
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_split_multihead_attention_in_training_and_eval(bias: bool) -> None:
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, bias=bias),
        num_layers=2,
        enable_nested_tensor=False,
    )
    x = torch.randn(3, 6, 16)
    encoder.eval()
    with torch.no_grad():
        reference = encoder(x)
    state = copy.deepcopy(encoder.state_dict())
    qkvlab.split_fused_qkv(encoder)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), reference, rtol=1e-6, atol=1e-6)
    encoder.train()
    out = encoder(x)
    torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-6)
    out.square().sum().backward()
    attn = encoder.layers[0].self_attn
    assert attn.q_proj_weight.grad is not None and attn.q_proj_weight.grad.abs().sum() > 0
    if bias:
        assert attn.v_bias.grad is not None
    converted = qkvlab.split_state_dict(state)
    assert set(converted) == set(encoder.state_dict())
    assert all(torch.equal(converted[k], v) for k, v in encoder.state_dict().items())
    qkvlab.fuse_split_qkv(encoder)
    encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), reference, rtol=1e-6, atol=1e-6)
    assert set(encoder.state_dict()) == set(state)


# -- regressions found in review ----------------------------------------------------------------


def test_train_set_never_unfreezes_what_peft_froze() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_hf_model("llama"), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    )
    groups = param_groups(model, lr=LR, weight_decay=WD, **preset_settings("qv-ratio"))
    names = [n for g in groups for n in g["param_names"]]
    assert names and all("lora_" in n for n in names)  # no lm_head, no un-adapted v_proj
    params = dict(model.named_parameters())
    assert not params["base_model.model.lm_head.weight"].requires_grad
    assert not params["base_model.model.model.layers.0.self_attn.v_proj.weight"].requires_grad


def test_lora_bias_takes_its_module_role() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_bert_classifier(), LoraConfig(r=2, target_modules=["query"], lora_bias=True))
    r = roles(model)
    assert r["base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.default.bias"] == "q"


def test_settings_for_roles_the_model_lacks_are_an_error() -> None:
    model = nn.Module()  # attention named the way no family in the architecture table names it
    model.layers = nn.ModuleList(
        nn.ModuleDict({"wq": nn.Linear(8, 8), "wkv": nn.Linear(8, 16)}) for _ in range(2)
    )
    model.classifier = nn.Linear(8, 2)
    with pytest.raises(qkvlab.UserError, match="no parameter with role q, v"):
        param_groups(model, lr=LR, weight_decay=WD, **preset_settings("qv-ratio"))


def test_mha_bias_k_and_bias_v_are_k_and_v_without_decay() -> None:
    mha = nn.MultiheadAttention(16, 4, add_bias_kv=True)
    r = roles(mha)
    assert r["bias_k"] == "k" and r["bias_v"] == "v"
    groups = param_groups(mha, lr=LR, weight_decay=WD)
    assert _group_of(groups, "bias_k")["weight_decay"] == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": float("nan")},
        {"weight_decay": float("nan")},
        {"overrides": {"other": {"lr_scale": True}}},
        {"overrides": {"other": {"weight_decay": float("nan")}}},
    ],
)
def test_nan_and_bool_settings_are_rejected(kwargs) -> None:
    settings = {"lr": LR, "weight_decay": WD, **kwargs}
    with pytest.raises(qkvlab.UserError):
        param_groups(nn.Linear(2, 2), **settings)


def test_split_mha_with_kdim_splits_its_shared_bias() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, kdim=12, vdim=12, batch_first=True)
    x, kv = torch.randn(2, 5, 16), torch.randn(2, 7, 12)
    reference = mha(x, kv, kv)[0]
    with pytest.raises(qkvlab.UserError, match="split_fused_qkv"):
        param_groups(mha, lr=LR, weight_decay=WD, train={"q", "v"})
    assert qkvlab.split_fused_qkv(mha) == [""]
    torch.testing.assert_close(mha(x, kv, kv)[0], reference)
    r = roles(mha)
    assert r["q_bias"] == "q" and r["v_bias"] == "v" and "qkv" not in r.values()
    groups = param_groups(mha, lr=LR, weight_decay=WD, train={"q", "v"})
    assert {g["role"] for g in groups} == {"q", "v"}
    qkvlab.fuse_split_qkv(mha)
    assert isinstance(mha.in_proj_bias, nn.Parameter)
    torch.testing.assert_close(mha(x, kv, kv)[0], reference)


# -- the families whose fused layouts are not thirds: GPT-NeoX (per head), Phi-3 (GQA blocks) -------


def test_roles_of_the_newer_families() -> None:
    neox = roles(tiny_hf_model("gpt-neox"))
    assert neox["gpt_neox.layers.1.attention.query_key_value.weight"] == "qkv"
    assert neox["gpt_neox.layers.1.attention.query_key_value.bias"] == "qkv"
    assert neox["gpt_neox.layers.1.attention.dense.weight"] == "o"
    assert neox["gpt_neox.layers.1.mlp.dense_h_to_4h.weight"] == "mlp"
    phi3 = roles(tiny_hf_model("phi3"))
    assert phi3["model.layers.0.self_attn.qkv_proj.weight"] == "qkv"
    assert phi3["model.layers.0.self_attn.o_proj.weight"] == "o"
    assert phi3["model.layers.0.mlp.gate_up_proj.weight"] == "mlp"  # fused too, but MLP
    opt = roles(tiny_hf_model("opt"))
    assert [
        opt[f"model.decoder.layers.2.self_attn.{m}.weight"]
        for m in ("q_proj", "k_proj", "v_proj", "out_proj")
    ] == [
        "q",
        "k",
        "v",
        "o",
    ]
    assert opt["model.decoder.layers.2.self_attn.q_proj.bias"] == "q"
    distil = roles(tiny_hf_model("distilbert"))
    assert [distil[f"transformer.layer.0.attention.{m}_lin.weight"] for m in ("q", "k", "v", "out")] == [
        "q",
        "k",
        "v",
        "o",
    ]


def test_t5_roles_and_per_role_groups_cover_all_three_kinds_of_attention() -> None:
    torch.manual_seed(0)
    config = tf.T5Config(
        vocab_size=64, d_model=32, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2, d_ff=48
    )
    model = tf.T5ForConditionalGeneration(config)
    table = roles(model)
    for prefix in (
        "encoder.block.1.layer.0.SelfAttention",
        "decoder.block.0.layer.0.SelfAttention",
        "decoder.block.1.layer.1.EncDecAttention",
    ):
        assert [table[f"{prefix}.{m}.weight"] for m in "qkvo"] == ["q", "k", "v", "o"]
    assert table["encoder.block.0.layer.1.DenseReluDense.wi.weight"] == "mlp"
    groups = param_groups(model, lr=LR, weight_decay=WD, **preset_settings("qv-ratio", ratio=4))
    trained = {g["role"]: g for g in groups}
    assert set(trained) == {"q", "v", "head"} or set(trained) <= {"q", "v", "head", "embed"}
    assert (
        trained["v"]["lr"] == pytest.approx(4 * LR) and len(trained["q"]["params"]) == 2 * 3
    )  # 2 enc + 2 dec self + 2 cross


@pytest.mark.parametrize("kind", ["gpt-neox", "phi3"])
def test_split_neox_per_head_and_phi3_blocks_keep_outputs_and_reload(kind: str, tmp_path) -> None:
    import transformers as tf

    model = tiny_hf_model(kind)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
    fused_state = copy.deepcopy(model.state_dict())
    spectra_before = qkvlab.inspect(model).heads
    assert len(qkvlab.split_fused_qkv(model)) == 3
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference, rtol=1e-6, atol=1e-6)
    attn = (
        "gpt_neox.layers.0.attention.query_key_value"
        if kind == "gpt-neox"
        else "model.layers.0.self_attn.qkv_proj"
    )
    shapes = {c: model.get_parameter(f"{attn}.{c}.weight").shape for c in "qkv"}
    # 6 heads of 8; Phi-3 has 2 key/value heads, so its k and v are a third of q
    assert shapes == (
        {c: (48, 48) for c in "qkv"} if kind == "gpt-neox" else {"q": (48, 48), "k": (16, 48), "v": (16, 48)}
    )
    table = roles(model)
    assert [table[f"{attn}.{c}.weight"] for c in "qkv"] == ["q", "k", "v"]
    # each child holds exactly the rows HF's own forward reads as that matrix
    full = fused_state[f"{attn}.weight"]
    if kind == "gpt-neox":
        per_head = full.view(6, 3, 8, 48)
        torch.testing.assert_close(model.get_parameter(f"{attn}.k.weight"), per_head[:, 1].reshape(48, 48))
    else:
        torch.testing.assert_close(model.get_parameter(f"{attn}.v.weight"), full[64:])
    saved = model.state_dict()  # the original architecture's names and layout
    assert set(saved) == set(fused_state) and all(torch.equal(saved[k], fused_state[k]) for k in saved)
    after = qkvlab.inspect(model).heads
    for x, y in zip(spectra_before, after, strict=True):
        assert x["singular_values"] == pytest.approx(y["singular_values"], rel=1e-12)
    with torch.no_grad():  # train the split model a little, save, reload as the original class
        model.get_parameter(f"{attn}.k.weight").add_(0.01)
        trained = model(ids).logits
    model.save_pretrained(tmp_path / kind)
    cls = tf.GPTNeoXForCausalLM if kind == "gpt-neox" else tf.Phi3ForCausalLM
    reloaded = cls.from_pretrained(tmp_path / kind, use_safetensors=True)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trained, rtol=1e-6, atol=1e-6)
    qkvlab.fuse_split_qkv(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, trained, rtol=1e-6, atol=1e-6)
