"""qkvlab's own models (registered with the architecture table) and the config schema."""

from __future__ import annotations

import pytest
import torch

import qkvlab
from qkvlab.config import TrainConfig, apply_overrides, load_config
from qkvlab.models import ModelConfig, build_model


def _models():
    yield "gpt", ModelConfig(kind="gpt", n_layer=2, n_head=3, d_model=24, d_head=5, vocab_size=40, seq_len=12)
    yield (
        "vit",
        ModelConfig(kind="vit", n_layer=2, n_head=2, d_model=16, image_size=8, patch_size=2, n_classes=10),
    )
    yield (
        "icl",
        ModelConfig(
            kind="icl", n_layer=2, n_head=2, d_model=16, input_dim=5, attention="linear", norm=False, d_mlp=0
        ),
    )


@pytest.mark.parametrize(("kind", "cfg"), list(_models()), ids=[k for k, _ in _models()])
def test_own_models_are_inspectable_with_roles(kind, cfg) -> None:
    torch.manual_seed(0)
    model = build_model(cfg)
    report = qkvlab.inspect(model)
    assert report.architecture.family == "qkvlab"
    assert (report.architecture.n_layers, report.architecture.n_heads, report.architecture.d_head) == (
        2,
        cfg.n_head,
        cfg.head_dim,
    )
    attn = model.blocks[1].attn
    for h in range(cfg.n_head):  # QK_h = W_K^hᵀ W_Q^h from the module's own weights
        sl = slice(h * cfg.head_dim, (h + 1) * cfg.head_dim)
        w_q, w_k = attn.q_proj.weight[sl].double(), attn.k_proj.weight[sl].double()
        expected = torch.linalg.svdvals(w_k.T @ w_q)[: cfg.head_dim]
        got = torch.tensor(report.select("qk", 1)[h]["singular_values"], dtype=torch.float64)
        torch.testing.assert_close(got, expected)
    roles = qkvlab.roles(model)
    assert roles["blocks.0.attn.q_proj.weight"] == "q" and roles["blocks.1.attn.o_proj.weight"] == "o"
    assert {"q", "k", "v", "o", "embed"} <= set(roles.values())
    groups = qkvlab.param_groups(model, lr=1e-3, weight_decay=0.1, **qkvlab.preset_settings("decoupled-attn"))
    assert {g["weight_decay"] for g in groups if g["role"] in "qkvo"} == {0.0}


def test_gpt_is_causal_and_vit_is_not() -> None:
    torch.manual_seed(0)
    gpt = build_model(dict(_models())["gpt"]).eval()
    ids = torch.randint(0, 40, (1, 12))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 40
    with torch.no_grad():
        a, b = gpt(ids)["logits"], gpt(changed)["logits"]
    torch.testing.assert_close(a[:, :-1], b[:, :-1])  # the future does not leak
    assert not torch.allclose(a[:, -1], b[:, -1])
    assert gpt.lm_head.weight is gpt.tok_embed.weight  # tied


def test_linear_attention_matches_its_formula() -> None:
    torch.manual_seed(0)
    cfg = dict(_models())["icl"]
    model = build_model(cfg)
    attn = model.blocks[0].attn
    x = torch.randn(2, 7, 16)
    q = attn.q_proj(x).view(2, 7, 2, 8).transpose(1, 2)
    k = attn.k_proj(x).view(2, 7, 2, 8).transpose(1, 2)
    v = attn.v_proj(x).view(2, 7, 2, 8).transpose(1, 2)
    expected = attn.o_proj(((q @ k.transpose(-1, -2) / 7) @ v).transpose(1, 2).reshape(2, 7, 16))
    torch.testing.assert_close(attn(x), expected)


def test_init_std_scales_every_weight_and_keeps_gpt2_residual_scaling() -> None:
    cfg = ModelConfig(kind="gpt", n_layer=2, n_head=4, d_model=128, d_head=32, vocab_size=500, seq_len=12)
    stds = {}
    for std in (0.02, 0.2):
        torch.manual_seed(0)
        model = build_model(ModelConfig(**{**cfg.__dict__, "init_std": std}))
        attn = model.blocks[0].attn
        stds[std] = (attn.q_proj.weight.std().item(), attn.o_proj.weight.std().item())
    for std, (q, o) in stds.items():
        assert q == pytest.approx(std, rel=0.05)
        assert o == pytest.approx(std / 2, rel=0.05)  # residual output: std / √(2·n_layer)
    assert ModelConfig().init_std == 0.02
    with pytest.raises(qkvlab.UserError, match=r"model\.init_std"):
        load_config(None, {"model.init_std": "0"})


# -- config ----------------------------------------------------------------------------------


def test_config_from_yaml_and_overrides(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "data: digits\nlr: 3e-4\nmodel:\n  kind: vit\n  n_layer: 3\noverrides:\n  q: {weight_decay: 0}\n"
    )
    config = load_config(
        path, {"model.d_head": "8", "train_roles": "q,v", "stop_at": "none", "online": "true"}
    )
    assert (config.data, config.lr, config.model.kind, config.model.n_layer, config.model.d_head) == (
        "digits",
        3e-4,
        "vit",
        3,
        8,
    )
    assert config.overrides == {"q": {"weight_decay": 0}}
    assert config.train_roles == ["q", "v"] and config.stop_at is None and config.online is True
    assert TrainConfig.from_dict(config.to_dict()) == config  # the saved config reloads exactly


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"learning_rate": "1"}, "unknown config key 'learning_rate'; did you mean .*lr"),
        ({"model.nlayer": "2"}, "did you mean model.n_layer"),
        ({"lr": "-1"}, r"lr=-1.0 is out of range; accepted: finite and > 0"),
        ({"lr": "inf"}, r"lr=inf is out of range; accepted: finite and > 0"),
        ({"grad_clip": "nan"}, r"grad_clip=nan is out of range; accepted: finite and ≥ 0"),
        ({"val_fraction": "0.9"}, r"accepted: in \(0, 0.5\]"),
        ({"optimizer": "lion"}, "accepted: adamw, adam-l2, sgd, muon"),
        ({"train_roles": "[1,2]"}, "train .*; accepted: role names"),  # YAML reads a list of numbers
        ({"max_steps": "ten"}, "accepted: an integer"),
        ({"online": "maybe"}, "accepted: true or false"),
        ({"model.attention": "linear"}, "only for model.kind=icl"),
        ({"warmup_steps": "2000"}, "must be < max_steps"),
        # 128 / 3 would floor to d_head 42 and quietly narrow the model to 126
        ({"model.n_head": "3"}, r"model.n_head=3 does not divide model.d_model=128; accepted: a divisor"),
        ({"model.n_head": "500"}, r"model.n_head=500 does not divide"),
    ],
)
def test_bad_config_values_are_user_errors(overrides, message) -> None:
    with pytest.raises(qkvlab.UserError, match=message):
        load_config(None, overrides)


def test_bad_yaml_file(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("lr: [unclosed\n")
    with pytest.raises(qkvlab.UserError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(qkvlab.UserError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("- a list\n")
    with pytest.raises(qkvlab.UserError, match="must hold a mapping"):
        load_config(path)


def test_derived_model_fields_are_not_keys() -> None:
    with pytest.raises(qkvlab.UserError, match=r"unknown config key 'model\.vocab_size'"):
        apply_overrides(TrainConfig(), {"model.vocab_size": "10"})


def test_linear_attention_set_to_one_gd_step_scores_the_gd_reference() -> None:
    # von Oswald et al. 2023: one linear-attention layer with W_Q = W_K = I on x, W_V reading y and
    # P = N·η* is one GD step from w = 0; the trainer's validation must find it at distance 0.
    import contextlib

    from qkvlab.data import load_dataset
    from qkvlab.train.evaluation import evaluate as _evaluate

    dim, points = 4, 12
    ds = load_dataset("icl-regression", icl_dim=dim, icl_points=points, seed=0)
    config = load_config(None, {"data": "icl-regression", "model.kind": "icl", "batch_size": "256"})
    cfg = ModelConfig(
        kind="icl", n_layer=1, n_head=1, d_model=dim + 1, d_head=dim + 1, input_dim=dim + 1,
        attention="linear", norm=False, d_mlp=0, bias=False,
    )  # fmt: skip
    model = build_model(cfg)
    x_only = torch.diag(torch.tensor([1.0] * dim + [0.0]))
    y_only = torch.diag(torch.tensor([0.0] * dim + [1.0]))
    with torch.no_grad():
        model.embed.weight.copy_(torch.eye(dim + 1))
        attn = model.blocks[0].attn
        attn.q_proj.weight.copy_(x_only)
        attn.k_proj.weight.copy_(x_only)
        attn.v_proj.weight.copy_(y_only)
        attn.o_proj.weight.copy_(points * ds.gd_step * torch.eye(dim + 1))
        model.head.weight.copy_(y_only[-1:])
        metrics = _evaluate(model, ds, config, torch.device("cpu"), contextlib.nullcontext)
    assert metrics["gd_distance"] < 1e-10
    assert metrics["loss"] == pytest.approx(metrics["gd_mse"], rel=1e-5)
    assert 0.25 < metrics["gd_mse"] < 0.45  # (d + 1)/(n + d + 1) = 5/16 in expectation, 2,048 tasks
    # in weight space it is GD exactly, whichever sign the two sides share
    from qkvlab.repro.paper000.icl_gd import gd_alignment

    exact = gd_alignment(model, ds.gd_step, points)
    assert exact["cosine"] == pytest.approx(1.0) and exact["step_ratio"] == pytest.approx(1.0)
    assert exact["qk_cosine"] == [pytest.approx(1.0)] and exact["ov_cosine"] == [pytest.approx(1.0)]
    assert exact["direct"] == pytest.approx(0.0)
    with torch.no_grad():
        attn.q_proj.weight.neg_()
        attn.v_proj.weight.neg_()
    flipped = gd_alignment(model, ds.gd_step, points)
    assert {k: flipped[k] for k in ("cosine", "step_ratio")} == pytest.approx(
        {"cosine": 1.0, "step_ratio": 1.0}
    )
    assert flipped["qk_cosine"] == [pytest.approx(1.0)]
    with torch.no_grad():
        attn.q_proj.weight.copy_(y_only)  # attends by y, not by x: no longer GD
    assert gd_alignment(model, ds.gd_step, points)["cosine"] < 0.1
    with torch.no_grad():
        model.head.weight.zero_()  # predicting 0 is far from GD
        far = _evaluate(model, ds, config, torch.device("cpu"), contextlib.nullcontext)
    assert far["gd_distance"] > 0.5 and far["loss"] > 0.8


def test_packaged_configs_are_named_from_any_directory(tmp_path, monkeypatch) -> None:
    from qkvlab.config import load_config, packaged_configs
    from qkvlab.errors import UserError

    monkeypatch.chdir(tmp_path)  # not the repository root
    assert packaged_configs() == ["digits-vit", "icl-linear", "shakespeare-gpt"]
    gpt = load_config("shakespeare-gpt", {"max_steps": 300})
    assert gpt.data == "shakespeare" and gpt.model.kind == "gpt" and gpt.max_steps == 300
    assert load_config("digits-vit.yaml").model.kind == "vit"
    (tmp_path / "shakespeare-gpt.yaml").write_text("max_steps: 7\nwarmup_steps: 1\n")
    assert load_config("shakespeare-gpt.yaml").max_steps == 7  # a file of that name wins
    with pytest.raises(UserError, match="packaged configs: digits-vit, icl-linear, shakespeare-gpt"):
        load_config("nope")
    with pytest.raises(UserError, match="no such config file: sub/shakespeare-gpt"):
        load_config("sub/shakespeare-gpt")  # a path is a path, never a packaged name


def test_every_config_key_belongs_to_exactly_one_components_section() -> None:
    from qkvlab import guard, optimizers, presets
    from qkvlab.config import KEY_HELP, config_keys, sections
    from qkvlab.data import keys as data_keys

    owned = [key for keys in sections().values() for key in keys]
    assert len(owned) == len(set(owned)) and set(owned) == set(config_keys())
    # the sections are the components' own tables, not copies
    assert sections()["data"] is data_keys.KEYS and sections()["guard"] is guard.KEYS
    assert sections()["per-matrix"] is presets.KEYS
    assert set(optimizers.get("muon").keys) <= set(sections()["optim"])
    assert KEY_HELP["rank_guard_kappa"] == guard.KEYS["rank_guard_kappa"][0]
    # a section's values, passed whole: the data section is load_dataset's keywords
    import inspect as pyinspect

    from qkvlab.data.sources import load_dataset

    config = load_config(None, {"data": "icl-regression", "icl_dim": "5"})
    data = config.section("data")
    assert data["icl_dim"] == 5 and data["data"] == "icl-regression"
    assert set(data) - {"data"} <= set(pyinspect.signature(load_dataset).parameters)
    assert config.section("model")["n_head"] == config.model.n_head
