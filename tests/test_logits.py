"""qkvlab.logits: the per-head largest logit and attention entropy, against logits formed by hand, and in
the engine on every monitor step."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch

from qkvlab.logits import measure_logits, qk_clip
from qkvlab.models import ModelConfig, build_model

from conftest import tiny_gpt_settings


def _by_hand(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(max, mean entropy) per head of every layer, from each attention layer's input and its weights."""
    inputs = _attention_inputs(model, x)
    return [_layer_by_hand(block.attn, h) for block, h in zip(model.blocks, inputs, strict=True)]


def _attention_inputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    inputs = []
    hooks = [
        block.attn.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach()))
        for block in model.blocks
    ]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return inputs


@torch.no_grad()
def _layer_by_hand(attn: torch.nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q·k/√d in float64 from the layer's input and its projections: max over everything, then the causal
    softmax's entropy per query, averaged."""
    heads, d = attn.n_head, attn.d_head
    q = attn.q_proj(h).view(*h.shape[:2], heads, d)
    k = attn.k_proj(h).view(*h.shape[:2], heads, d)
    top, entropy = [], []
    for head in range(heads):
        s = torch.einsum("bid,bjd->bij", q[:, :, head].double(), k[:, :, head].double()) / math.sqrt(d)
        top.append(s.max())
        t = s.shape[-1]
        p = torch.softmax(s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -math.inf), -1)
        entropy.append(-(p * torch.log(p.clamp_min(1e-300))).sum(-1).mean())
    return torch.stack(top), torch.stack(entropy)


def test_measured_logits_are_those_formed_by_hand_and_the_output_is_unchanged() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(kind="gpt", vocab_size=30, seq_len=12, n_layer=2, d_model=24, n_head=3, dropout=0.0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # larger weights than the init's, so the logits are far from 0
        for block in model.blocks:
            block.attn.q_proj.weight.mul_(8)
            block.attn.k_proj.weight.mul_(8)
    x = torch.randint(0, 30, (4, 12))
    fused = model(x)["logits"]
    with measure_logits(model) as reading:
        measured = model(x)["logits"]
    assert torch.equal(
        measured, fused
    )  # the fused kernel still computes the output: watching changes nothing
    assert all(block.attn.probe is None for block in model.blocks)  # disarmed after the block

    expected = _by_hand(model, x)
    assert len(reading.layers) == 2
    for layer, (top, entropy) in zip(reading.layers, expected, strict=True):
        assert layer.rows == 4 * 12
        torch.testing.assert_close(layer.max.double(), top, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close((layer.entropy_sum / layer.rows).double(), entropy, rtol=1e-5, atol=1e-5)
        assert float(top.abs().max()) > 1.0  # not a test of zeros
    record = reading.to_dict()
    assert len(record["max"]) == 2 and len(record["max"][0]) == 3
    scalars = reading.scalars()
    assert scalars["max"] == pytest.approx(max(float(t.max()) for t, _ in expected), rel=1e-5)
    assert 0 < scalars["L0/entropy_mean"] < math.log(12)


# scores per block: one batch element (3 heads × 12 × 12), one head of it, 3 query rows of one head,
# and less than one row (one row of one head at a time)
@pytest.mark.parametrize("chunk", [432, 144, 36, 5])
@pytest.mark.parametrize("entropy", [False, True])
def test_a_reading_leaves_the_step_bit_identical_and_slices_the_scores(entropy, chunk, monkeypatch) -> None:
    from qkvlab.models import transformer

    torch.manual_seed(0)
    cfg = ModelConfig(kind="gpt", vocab_size=30, seq_len=12, n_layer=2, d_model=24, n_head=3, dropout=0.0)
    model = build_model(cfg)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.q_proj.weight.mul_(8)
    x = torch.randint(0, 30, (5, 12))
    fused = model(x)["logits"]
    fused.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    monkeypatch.setattr(transformer, "SCORE_CHUNK", chunk)
    with measure_logits(model, entropy=entropy) as reading:
        measured = model(x)["logits"]
    measured.sum().backward()
    assert torch.equal(measured, fused)  # the fused kernel ran: the very same numbers
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    for layer, (top, mean_entropy) in zip(reading.layers, _by_hand(model, x), strict=True):
        torch.testing.assert_close(layer.max.double(), top, rtol=1e-5, atol=1e-5)
        if entropy:  # summed over the slices: every query row of the batch counted once
            assert layer.rows == 5 * 12
            torch.testing.assert_close(
                (layer.entropy_sum / layer.rows).double(), mean_entropy, rtol=1e-5, atol=1e-5
            )
        else:
            assert layer.entropy_sum is None
    record, scalars = reading.to_dict(), reading.scalars()
    assert len(record["max"]) == 2 and len(record["entropy"]) == (2 if entropy else 0)
    assert "max" in scalars and any(k.endswith("entropy_mean") for k in scalars) == entropy


def test_under_bf16_autocast_the_logits_are_measured_in_float32() -> None:
    torch.manual_seed(3)
    cfg = ModelConfig(kind="gpt", vocab_size=30, seq_len=12, n_layer=1, d_model=32, n_head=2, dropout=0.0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # logits near 45, where bf16's spacing is 0.25
        model.blocks[0].attn.q_proj.weight.mul_(30)
        model.blocks[0].attn.k_proj.weight.mul_(30)
    attn, seen = model.blocks[0].attn, {}
    hooks = [
        attn.q_proj.register_forward_hook(lambda _m, _a, out: seen.__setitem__("q", out.detach())),
        attn.k_proj.register_forward_hook(lambda _m, _a, out: seen.__setitem__("k", out.detach())),
    ]
    x = torch.randint(0, 30, (4, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16), measure_logits(model) as reading:
        model(x)
    for hook in hooks:
        hook.remove()
    assert (
        seen["q"].dtype == torch.bfloat16
    )  # the projections ran in bf16; their products are measured exactly
    q, k = (seen[r].double().view(4, 12, 2, 16).transpose(1, 2) for r in ("q", "k"))
    top = (q @ k.transpose(-1, -2) / 4.0).amax(dim=(0, 2, 3))
    assert float(top.max()) > 32
    torch.testing.assert_close(reading.layers[0].max.double(), top, rtol=1e-6, atol=1e-6)


def test_measure_logits_on_a_model_without_qkvlabs_attention_says_so_in_one_line() -> None:
    from qkvlab.errors import UserError

    from conftest import tiny_hf_model

    with pytest.raises(UserError, match="logit_ceiling"), measure_logits(tiny_hf_model("gpt2")):
        pass
    linear = build_model(
        ModelConfig(kind="gpt", vocab_size=30, seq_len=8, n_layer=1, d_model=16, n_head=2, attention="linear")
    )
    with measure_logits(linear) as reading:  # qkvlab's, but no softmax: nothing to measure
        linear(torch.randint(0, 30, (2, 8)))
    assert reading.layers == [] and not reading.measured


def test_qk_clip_leaves_a_shared_key_and_a_head_without_a_finite_logit_alone() -> None:
    from qkvlab.logits import LayerLogits, LogitReading

    model, _ = _big_logits_model(bias=False)
    attn = model.blocks[0].attn  # 4 heads of d_head 6; its key made one projection shared by every head
    attn.k_proj = torch.nn.Linear(24, 6, bias=False)
    q_before, k_before = attn.q_proj.weight.detach().clone(), attn.k_proj.weight.detach().clone()
    stats = LayerLogits(max=torch.tensor([10.0, 2.0, float("inf"), float("nan")]))
    assert qk_clip(LogitReading([stats], [attn]), 5.0, ["q", "k"]) == 1
    assert torch.equal(attn.k_proj.weight, k_before)
    gamma = torch.tensor([0.5, 1.0, 1.0, 1.0]).repeat_interleave(6)[:, None]  # γ on the query side alone
    torch.testing.assert_close(attn.q_proj.weight, q_before * gamma, rtol=0, atol=0)


def test_two_forward_passes_keep_the_max_and_average_the_entropy() -> None:
    torch.manual_seed(1)
    cfg = ModelConfig(kind="gpt", vocab_size=30, seq_len=8, n_layer=1, d_model=16, n_head=2, dropout=0.0)
    model = build_model(cfg).eval()
    a, b = torch.randint(0, 30, (2, 8)), torch.randint(0, 30, (3, 8))
    with measure_logits(model) as both:
        model(a)
        model(b)
    with measure_logits(model) as whole:
        model(torch.cat([a, b]))
    torch.testing.assert_close(both.layers[0].max, whole.layers[0].max)
    torch.testing.assert_close(both.layers[0].entropy_sum, whole.layers[0].entropy_sum, rtol=1e-5, atol=1e-6)
    assert both.layers[0].rows == whole.layers[0].rows == 5 * 8


def test_the_engine_logs_logits_on_every_monitor_step(corpus, tmp_path) -> None:
    from qkvlab.config import load_config
    from qkvlab.train import train

    run = tmp_path / "run"
    train(load_config(None, tiny_gpt_settings(corpus, run, spectra_every=4)))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [x for x in lines if x["split"] == "logits"]
    assert [x["step"] for x in logged] == [4, 8, 12]
    assert all({"L0/max", "L1/max", "L0/entropy_mean", "max"} <= set(x) for x in logged)
    assert all(x["max"] == max(x["L0/max"], x["L1/max"]) for x in logged)
    # beside each: the ceiling the weights after that step give the inputs that step saw (qkvlab.logits)
    assert all({"L0/ceiling", "L1/ceiling", "ceiling"} <= set(x) for x in logged)
    series = [json.loads(x) for x in (run / "spectra.jsonl").read_text().splitlines()]
    assert [x["step"] for x in series] == [0, 4, 8, 12]
    assert "logits" not in series[0]  # the initial weights: no forward pass measured yet
    for line, logs in zip(series[1:], logged, strict=True):
        assert len(line["logits"]["max"]) == 2 and len(line["logits"]["max"][0]) == 2  # layers × heads
        assert max(line["logits"]["max"][0]) == pytest.approx(logs["L0/max"])
        assert all(0 <= e <= math.log(16) for e in line["logits"]["entropy"][1])


def _big_logits_model(bias: bool) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(2)
    cfg = ModelConfig(
        kind="gpt", vocab_size=30, seq_len=10, n_layer=2, d_model=24, n_head=4, dropout=0.0, bias=bias
    )
    model = build_model(cfg).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.q_proj.weight.mul_(10)
            block.attn.k_proj.weight.mul_(10)
            if bias:
                block.attn.q_proj.bias.normal_(0, 0.5)
                block.attn.k_proj.bias.normal_(0, 0.5)
    return model, torch.randint(0, 30, (3, 10))


@pytest.mark.parametrize(("roles", "bias"), [(["q", "k"], True), (["q"], False), (["k"], True)])
def test_qk_clip_brings_each_heads_largest_logit_back_to_tau_and_leaves_the_rest(roles, bias) -> None:
    model, x = _big_logits_model(bias)
    inputs = _attention_inputs(model, x)
    with measure_logits(model) as reading:
        model(x)
    tops = torch.cat([layer.max for layer in reading.layers])
    tau = float(tops.median())  # about half of the heads pass it
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert qk_clip(reading, tau, roles) == int((tops > tau).sum()) > 0

    for block, h, layer in zip(model.blocks, inputs, reading.layers, strict=True):
        after, _ = _layer_by_hand(block.attn, h)  # the same inputs, the clipped weights
        over = layer.max > tau
        torch.testing.assert_close(after[over], torch.full_like(after[over], tau), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(after[~over], layer.max[~over].double(), rtol=1e-5, atol=1e-5)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    expected = {
        f"blocks.{i}.attn.{r}_proj.{kind}" for i in range(2) for r in roles for kind in ("weight", "bias")
    }
    assert changed == (expected if bias else {n for n in expected if n.endswith("weight")})


def test_qk_clip_in_the_engine_holds_logits_down_logs_its_work_and_resumes_bit_identically(corpus, tmp_path):
    from safetensors.torch import load_file

    from qkvlab.config import load_config
    from qkvlab.files import latest_checkpoint
    from qkvlab.train import train

    fast = {"lr": "0.05", "spectra_every": "4", "warmup_steps": "1"}  # logits grow at this rate
    train(load_config(None, tiny_gpt_settings(corpus, tmp_path / "free", **fast)))
    clip = {**fast, "qk_clip": "1.0"}
    train(load_config(None, tiny_gpt_settings(corpus, tmp_path / "clipped", **clip)))
    lines = [json.loads(x) for x in (tmp_path / "clipped" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x["split"] == "train"]
    assert all("qk_clipped_heads" in x and "logit_max" in x for x in steps)
    assert sum(x["qk_clipped_heads"] for x in steps) > 0
    free = [json.loads(x) for x in (tmp_path / "free" / "metrics.jsonl").read_text().splitlines()]
    assert all("qk_clipped_heads" not in x for x in free)
    peak = {
        run: max(x["max"] for x in rows if x["split"] == "logits")
        for run, rows in (("free", free), ("clipped", lines))
    }
    assert peak["free"] > 1.5 and peak["clipped"] < peak["free"]

    train(load_config(None, tiny_gpt_settings(corpus, tmp_path / "split", **clip, stop_at=6)))
    config = load_config(None, tiny_gpt_settings(corpus, tmp_path / "split", **clip))
    train(config, resume=tmp_path / "split")
    a = load_file(latest_checkpoint(tmp_path / "clipped") / "model.safetensors")
    b = load_file(latest_checkpoint(tmp_path / "split") / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_between_two_train_lines_logs_them_as_an_unbroken_run_would(corpus, tmp_path) -> None:
    from qkvlab.config import load_config
    from qkvlab.train import train

    # a train line every 5 steps, checkpoints every 4; a crash after step 8 whose checkpoint-8 is damaged
    # resumes from checkpoint-4, and the line at 5 covers steps 1–5 either way
    clip = {"lr": "0.05", "spectra_every": "4", "warmup_steps": "1", "qk_clip": "1.0", "log_every": "5"}
    train(load_config(None, tiny_gpt_settings(corpus, tmp_path / "whole", **clip)))
    split = tmp_path / "split"
    train(load_config(None, tiny_gpt_settings(corpus, split, **clip, stop_at=8)))
    (split / "checkpoint-00000008" / "model.safetensors").write_bytes(b"damaged")
    train(load_config(None, tiny_gpt_settings(corpus, split, **clip)), resume=split)

    def lines(run: str) -> list[dict]:
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        keep = ("step", "loss", "logit_max", "qk_clipped_heads")
        return [{k: x[k] for k in keep} for x in rows if x["split"] == "train"]

    whole = lines("whole")
    assert [x["step"] for x in whole] == [5, 10, 12]
    assert whole[0]["qk_clipped_heads"] > 0 and whole[1]["qk_clipped_heads"] > 0
    assert lines("split") == whole


@pytest.mark.parametrize("per_head", ["", "q,k"], ids=["muon", "muon-per-head"])
def test_qk_clip_with_muon_clips_and_resumes_bit_identically(corpus, tmp_path, per_head) -> None:
    from safetensors.torch import load_file

    from qkvlab.config import load_config
    from qkvlab.files import latest_checkpoint
    from qkvlab.train import train

    # Muon's logits reach about 0.25 in these 12 steps: τ = 0.1 binds from step 3
    clip = {"lr": "0.05", "spectra_every": "4", "warmup_steps": "1", "optimizer": "muon", "qk_clip": "0.1"}
    if per_head:
        clip["muon_per_head"] = per_head
    train(load_config(None, tiny_gpt_settings(corpus, tmp_path / "whole", **clip)))
    lines = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert sum(x["qk_clipped_heads"] for x in lines if x["split"] == "train") > 0
    train(load_config(None, tiny_gpt_settings(corpus, tmp_path / "split", **clip, stop_at=6)))
    train(load_config(None, tiny_gpt_settings(corpus, tmp_path / "split", **clip)), resume=tmp_path / "split")
    a = load_file(latest_checkpoint(tmp_path / "whole") / "model.safetensors")
    b = load_file(latest_checkpoint(tmp_path / "split") / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_that_stops_logs_the_largest_logit_of_the_step_that_went_wrong(corpus, tmp_path, monkeypatch):
    import qkvlab.errors
    from qkvlab.config import load_config
    from qkvlab.train import loop as trainer
    from qkvlab.train import train

    every = {"lr": "0.05", "warmup_steps": "1", "logit_every": "1"}
    train(load_config(None, tiny_gpt_settings(corpus, tmp_path / "whole", **every)))
    real, calls = trainer.nonfinite_step, {"n": 0}

    def bad_at_five(loss, grad_norm, ddp):
        calls["n"] += 1
        return "gradient norm is not finite" if calls["n"] == 5 else real(loss, grad_norm, ddp)

    monkeypatch.setattr(trainer, "nonfinite_step", bad_at_five)
    with pytest.raises(qkvlab.errors.TrainingStopped, match="step 5"):
        train(load_config(None, tiny_gpt_settings(corpus, tmp_path / "stopped", **every)))
    whole, stopped = (
        {
            x["step"]: x
            for x in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
            if x["split"] == "train"
        }
        for run in ("whole", "stopped")
    )
    assert sorted(stopped) == [1, 2, 3, 4, 5] and "loss" not in stopped[5]
    # the same weights and batch up to step 5: its logits are the full run's step 5
    assert stopped[5]["logit_max"] == pytest.approx(whole[5]["logit_max"], rel=1e-6)


def test_logit_every_measures_between_monitor_firings_without_clipping(corpus, tmp_path) -> None:
    from qkvlab.config import load_config
    from qkvlab.errors import UserError
    from qkvlab.train import train

    every = {"lr": "0.05", "spectra_every": "4", "warmup_steps": "1", "log_every": "1"}
    train(load_config(None, tiny_gpt_settings(corpus, tmp_path / "each", **every, logit_every="1")))
    lines = [json.loads(x) for x in (tmp_path / "each" / "metrics.jsonl").read_text().splitlines()]
    train_lines = {x["step"]: x for x in lines if x["split"] == "train"}
    assert all("logit_max" in x and "qk_clipped_heads" not in x for x in train_lines.values())
    fired = [x for x in lines if x["split"] == "logits"]
    assert fired  # on a firing step the train line's max is the monitor's own, from the same forward pass
    for x in fired:
        assert train_lines[x["step"]]["logit_max"] == pytest.approx(x["max"], rel=1e-6)

    train(load_config(None, tiny_gpt_settings(corpus, tmp_path / "third", **every, logit_every="3")))
    lines = [json.loads(x) for x in (tmp_path / "third" / "metrics.jsonl").read_text().splitlines()]
    measured = sorted(x["step"] for x in lines if x["split"] == "train" and "logit_max" in x)
    assert measured and all(step % 3 == 0 for step in measured)
    with pytest.raises(UserError, match="logit_every needs softmax attention"):
        load_config(
            None,
            tiny_gpt_settings(corpus, tmp_path / "linear", logit_every="2", **{"model.attention": "linear"}),
        )


def test_head_ceilings_are_reached_by_the_top_singular_pair_and_hold_with_biases_and_rotations() -> None:
    from qkvlab.logits import head_ceilings

    torch.manual_seed(3)
    heads, d, d_head, norm = 3, 10, 4, 2.5
    q, k = (
        torch.randn(heads, d, d_head, dtype=torch.float64),
        torch.randn(heads, d, d_head, dtype=torch.float64),
    )
    ceiling = head_ceilings(q, k, None, None, norm, rotary=False)
    for h in range(heads):  # x_i, x_j: the top singular pair of Q Kᵀ, at norm M
        u, _, vh = torch.linalg.svd(q[h] @ k[h].T)
        logit = (norm * u[:, 0]) @ q[h] @ k[h].T @ (norm * vh[0]) / math.sqrt(d_head)
        assert float(logit) == pytest.approx(float(ceiling[h]), rel=1e-10)

    b, c = torch.randn(heads, d_head, dtype=torch.float64), torch.randn(heads, d_head, dtype=torch.float64)
    with_bias = head_ceilings(q, k, b, c, norm, rotary=False)
    rotary = head_ceilings(q, k, b, c, norm, rotary=True)
    x = torch.randn(4000, d, dtype=torch.float64)
    x = norm * x / x.norm(dim=-1, keepdim=True)  # inputs on the sphere of radius M
    angle = torch.rand(d_head // 2, dtype=torch.float64) * 6.3
    rotation = torch.block_diag(*[torch.tensor([[a.cos(), -a.sin()], [a.sin(), a.cos()]]) for a in angle])
    for h in range(heads):
        qs, ks = x @ q[h] + b[h], x @ k[h] + c[h]
        plain = (qs @ ks.T).abs().max() / math.sqrt(d_head)
        rotated = (qs @ rotation @ ks.T).abs().max() / math.sqrt(d_head)
        assert plain <= with_bias[h] and rotated <= rotary[h] and plain <= rotary[h]
        assert plain > 0.3 * with_bias[h]  # sampled inputs come near it: the bias terms are not slack


def _softmax_inputs(monkeypatch) -> list[torch.Tensor]:
    """Per softmax over attention scores ((batch, heads, q, k)), the largest input of each head: the
    model's own logits (after its scale and mask; masked pairs are very negative)."""
    from torch.nn import functional

    seen: list[torch.Tensor] = []
    original = functional.softmax

    def recording(x, *args, **kwargs):
        if x.dim() == 4:
            seen.append(x.detach().double().amax(dim=(0, 2, 3)))
        return original(x, *args, **kwargs)

    monkeypatch.setattr(functional, "softmax", recording)
    return seen


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "qwen2", "opt", "phi3"])
def test_the_monitor_ceiling_holds_every_heads_logits_in_hf_models(kind, monkeypatch, tmp_path) -> None:
    from qkvlab.monitor import Monitor

    from conftest import tiny_hf_model

    model = tiny_hf_model(kind).eval()
    model.set_attn_implementation("eager")  # scores through nn.functional.softmax, where they are seen
    with torch.no_grad():  # logits far from 0
        for name, p in model.named_parameters():
            if name.endswith(
                ("q_proj.weight", "k_proj.weight", "query.weight", "key.weight", "c_attn.weight")
            ):
                p.mul_(6)
    monitor = Monitor(model, every=1, out=tmp_path)
    seen = _softmax_inputs(monkeypatch)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 64, (3, 9)))
    record = monitor.record(1)
    ceiling = record["logit_ceiling"]
    assert len(seen) == len(ceiling["ceiling"]) == 3
    for logits, heads in zip(seen, ceiling["ceiling"], strict=True):
        assert len(heads) == len(logits)
        assert all(0 < float(top) <= bound * (1 + 1e-6) for top, bound in zip(logits, heads, strict=True))
    line = json.loads((tmp_path / "spectra.jsonl").read_text())
    assert line["logit_ceiling"]["ceiling"] == ceiling["ceiling"]
    assert monitor.ceiling.read() is None  # the inputs are forgotten once read


def test_the_ceiling_window_survives_a_resume_and_close_removes_its_hooks() -> None:
    from qkvlab.monitor import Monitor

    torch.manual_seed(5)
    cfg = ModelConfig(kind="gpt", vocab_size=30, seq_len=10, n_layer=2, d_model=16, n_head=2, dropout=0.0)
    model = build_model(cfg)
    with torch.no_grad():  # a large input norm for one pass, then the LayerNorm's usual one
        model.blocks[0].ln_attn.weight.mul_(5)
    first = Monitor(model, every=10)
    model(torch.randint(0, 30, (2, 10)))
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint keeps
    big = state["input_norms"][0]
    first.close()
    assert not any(m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        model.blocks[0].ln_attn.weight.div_(5)
    resumed = Monitor(model, every=10)
    resumed.load_state_dict(state)
    model(torch.randint(0, 30, (2, 10)))
    read = resumed.ceiling.read()
    assert read["input_norm_max"][0] == pytest.approx(big) and big > 2 * read["input_norm_max"][1]
    resumed.close()


def test_families_whose_scores_are_not_the_projections_products_get_no_ceiling_and_the_reason() -> None:
    import transformers as tf

    from qkvlab.logits import LogitCeiling

    torch.manual_seed(0)
    qwen3 = tf.Qwen3Model(
        tf.Qwen3Config(
            vocab_size=32,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=1,
            intermediate_size=32,
            head_dim=8,
        )
    )
    ceiling = LogitCeiling(qwen3)
    assert "q_norm" in ceiling.reason
    assert ceiling.read() == {"ceiling": None, "reason": ceiling.reason}

    from conftest import tiny_hf_model

    assert "relative position" in LogitCeiling(tiny_hf_model("t5")).reason
    unscaled = tf.GPT2LMHeadModel(
        tf.GPT2Config(n_embd=16, n_head=2, n_layer=1, vocab_size=32, scale_attn_weights=False)
    )
    assert "scale_attn_weights=False" in LogitCeiling(unscaled).reason

    class Holder(torch.nn.Module):  # a LightningModule or a user's module holding the HF model
        def __init__(self) -> None:
            super().__init__()
            self.model = unscaled

    assert "scale_attn_weights=False" in LogitCeiling(Holder()).reason
    assert LogitCeiling(tiny_hf_model("gpt2")).reason == ""
    linear = build_model(
        ModelConfig(kind="gpt", vocab_size=30, seq_len=8, n_layer=1, d_model=16, n_head=2, attention="linear")
    )
    assert "linear attention" in LogitCeiling(linear).reason


def test_a_plain_loop_hands_its_logits_to_the_monitor_which_records_and_sends_them(tmp_path) -> None:
    from qkvlab.monitor import Monitor

    torch.manual_seed(4)
    cfg = ModelConfig(kind="gpt", vocab_size=30, seq_len=10, n_layer=2, d_model=16, n_head=2, dropout=0.0)
    model = build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    class Writer:  # what a SummaryWriter is asked
        def __init__(self) -> None:
            self.tags: dict[str, list[int]] = {}

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            self.tags.setdefault(tag, []).append(step)

    writer = Writer()
    monitor = Monitor(model, every=2, out=tmp_path, optimizer=optimizer, writer=writer)
    for step in range(1, 5):
        x = torch.randint(0, 30, (4, 10))
        with measure_logits(model) if step % 2 == 0 else contextlib.nullcontext() as reading:
            loss = model(x, labels=x)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        monitor.step(step, logits=reading)
    lines = [json.loads(x) for x in (tmp_path / "spectra.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4]
    assert all(len(x["logits"]["max"]) == 2 and "logit_ceiling" in x for x in lines)
    for x in lines:  # the ceiling of the weights after the step, from the inputs of its forward pass
        assert all(len(layer) == 2 for layer in x["logit_ceiling"]["ceiling"])
    assert writer.tags["logits/L0/max"] == [2, 4] and writer.tags["logits/L1/ceiling"] == [2, 4]
