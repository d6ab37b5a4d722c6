"""HF Trainer integration: create_optimizer + SpectraCallback on a tiny BERT built from a config."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

import qkvlab
from qkvlab.hf import SpectraCallback, create_optimizer


class _Toy(torch.utils.data.Dataset):
    def __init__(self, n: int = 32) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 64, (n, 12), generator=gen)
        self.labels = (self.ids[:, 0] % 2).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _model() -> tf.PreTrainedModel:
    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=64, hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=48
    )
    return tf.BertForSequenceClassification(config)


def test_trainer_with_qkvlab_optimizer_and_spectra_callback(tmp_path) -> None:
    model = _model()
    key_before = model.bert.encoder.layer[0].attention.self.key.weight.detach().clone()
    query_before = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    args = tf.TrainingArguments(
        output_dir=str(tmp_path),
        learning_rate=1e-3,
        weight_decay=0.05,
        max_steps=4,
        per_device_train_batch_size=8,
        logging_steps=100,
        report_to=["tensorboard"],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    optimizer = create_optimizer(model, args, preset="qv-ratio", preset_args={"ratio": 4})
    by_role = {}
    for g in optimizer.param_groups:
        by_role.setdefault(g["role"], set()).add((g["lr"], g["weight_decay"]))
    assert by_role["q"] == {(1e-3, 0.05), (1e-3, 0.0)}  # matrices decayed with the Trainer's λ, biases not
    assert by_role["v"] == {(4e-3, 0.05), (4e-3, 0.0)}
    assert set(by_role) == {"q", "v", "head"}

    trainer = tf.Trainer(model=model, args=args, train_dataset=_Toy(), optimizers=(optimizer, None))
    SpectraCallback.install(trainer, every_n_steps=2)
    trainer.train()
    assert not any(m._forward_pre_hooks for m in model.modules())  # the logit ceiling's, removed at the end

    assert torch.equal(model.bert.encoder.layer[0].attention.self.key.weight, key_before)
    assert not torch.equal(model.bert.encoder.layer[0].attention.self.query.weight, query_before)

    lines = (tmp_path / "spectra.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4]
    record = json.loads(lines[-1])
    assert record["architecture"]["n_heads"] == 4 and len(record["heads"]) == 2 * 2 * 4
    assert set(record["heads"][0]) >= {"singular_values", "effective_rank", "gap", "imbalance"}
    # the spectra in the file are those of the model at that step
    final = qkvlab.inspect(model)
    assert record["heads"][0]["singular_values"] == pytest.approx(final.heads[0]["singular_values"])
    # and `qkvlab report` draws the callback's log against the step (it used to refuse it)
    from qkvlab.cli import main

    assert main(["report", str(tmp_path / "spectra.jsonl"), "--out", str(tmp_path / "report")]) == 0
    assert f"## Over 2 checkpoints: {tmp_path.name}" in (tmp_path / "report" / "report.md").read_text()

    logged = [entry for entry in trainer.state.log_history if "spectra/qk_erank_mean" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    # the console gets the model-wide numbers only (per-layer keys flooded it: 86 for MiniLM)
    assert {k for k in logged[0] if k.startswith("spectra/")} == {
        "spectra/qk_erank_mean",
        "spectra/ov_erank_mean",
    }

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = (tmp_path / "runs").iterdir()  # the Trainer's own TensorBoard folder
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/spectra/qk_erank_mean" in tags or "spectra/qk_erank_mean" in tags, tags
    tag = "train/spectra/qk_erank_mean" if "train/spectra/qk_erank_mean" in tags else "spectra/qk_erank_mean"
    assert [e.step for e in events.Scalars(tag)] == [2, 4]
    # the per-layer detail goes to the same TensorBoard run (not to the console), and the file is the
    # versioned series; k and o are frozen here, so no decay prediction is made for either product
    assert [e.step for e in events.Scalars("spectra/L1/ov_erank_min")] == [2, 4]
    assert record["series_version"] == 1 and record["epoch"] == pytest.approx(trainer.state.epoch)
    assert record["imbalance_decay_per_step"]["predicted_weight_decay_part"] == {"qk": None, "ov": None}


def test_trainer_weight_decay_is_not_dropped_with_loraplus(tmp_path) -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    args = tf.TrainingArguments(
        output_dir=str(tmp_path), learning_rate=2e-4, weight_decay=0.1, report_to=[], use_cpu=True
    )
    optimizer = create_optimizer(model, args, preset="loraplus", preset_args={"ratio": 16})
    lora_b = [g for g in optimizer.param_groups if g.get("lora") == "B"]
    assert lora_b and all(g["lr"] == pytest.approx(16 * 2e-4) and g["weight_decay"] == 0.1 for g in lora_b)
    assert isinstance(optimizer, torch.optim.AdamW)


def test_inspect_of_peft_model_sees_the_adapted_weights() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(), LoraConfig(r=4, target_modules=["query", "value"]))
    with torch.no_grad():  # make the adapters non-zero (PEFT initialises lora_B to 0)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    adapted = qkvlab.inspect(model)
    merged = qkvlab.inspect(model.merge_and_unload())
    for x, y in zip(adapted.heads, merged.heads, strict=True):
        assert x["singular_values"] == pytest.approx(y["singular_values"], rel=1e-5, abs=1e-6)


def test_create_optimizer_merges_overrides_and_rejects_l2(tmp_path) -> None:
    args = tf.TrainingArguments(
        output_dir=str(tmp_path), learning_rate=1e-3, weight_decay=0.1, report_to=[], use_cpu=True
    )
    optimizer = create_optimizer(_model(), args, preset="qv-ratio", overrides={"head": {"lr_scale": 2.0}})
    by_role = {g["role"]: g["lr"] for g in optimizer.param_groups}
    assert by_role["v"] == pytest.approx(4e-3) and by_role["head"] == pytest.approx(2e-3)  # both kept
    with pytest.raises(qkvlab.UserError, match=r"never adds qkvlab\.l2_penalty"):
        create_optimizer(_model(), args, regularization="l2")


def test_inspect_of_dora_model_matches_its_merge() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(), LoraConfig(r=4, target_modules=["query", "value"], use_dora=True))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
            if "lora_magnitude_vector" in name:
                param.mul_(1.3)
    adapted = qkvlab.inspect(model)
    merged = qkvlab.inspect(model.merge_and_unload())
    for x, y in zip(adapted.heads, merged.heads, strict=True):
        assert x["singular_values"] == pytest.approx(y["singular_values"], rel=1e-5, abs=1e-6)


def test_create_optimizer_keeps_a_preset_decay_under_an_lr_override(tmp_path) -> None:
    args = tf.TrainingArguments(
        output_dir=str(tmp_path), learning_rate=1e-3, weight_decay=0.1, report_to=[], use_cpu=True
    )
    optimizer = create_optimizer(
        _model(),
        args,
        preset="decoupled-attn",
        preset_args={"attn_weight_decay": 0.0},
        overrides={"v": {"lr_scale": 4.0}},
    )
    v = [g for g in optimizer.param_groups if g["role"] == "v" and g["params"][0].ndim == 2]
    assert v and all(g["weight_decay"] == 0.0 and g["lr"] == pytest.approx(4e-3) for g in v)
    mlp = [g for g in optimizer.param_groups if g["role"] == "mlp" and g["params"][0].ndim == 2]
    assert mlp[0]["weight_decay"] == 0.1


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 48) -> None:
        self.ids = torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _llama() -> tf.PreTrainedModel:
    """A tiny Llama with grouped-query attention: 4 query heads, 2 key/value heads of 16."""
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=64, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, intermediate_size=96,
    )  # fmt: skip
    return tf.LlamaForCausalLM(config)


def _muon_args(tmp_path, **kwargs) -> tf.TrainingArguments:
    return tf.TrainingArguments(
        output_dir=str(tmp_path), learning_rate=3e-3, weight_decay=0.1, per_device_train_batch_size=8,
        logging_steps=100, report_to=[], use_cpu=True, disable_tqdm=True, seed=0, **kwargs,
    )  # fmt: skip


def test_muon_for_the_trainer_groups_heads_and_resumes_identically(tmp_path) -> None:
    """create_muon_optimizer: Muon on the hidden matrices (per head where asked, with the model's own
    head counts under GQA), AdamW on the rest; the Trainer trains with it, and a run resumed from its
    checkpoint ends on the same weights as one that was not stopped."""
    from qkvlab.hf import create_muon_optimizer

    model = _llama()
    optimizer = create_muon_optimizer(model, _muon_args(tmp_path), per_head="q,k,v,o")
    tags = {g["role"]: (g["algorithm"], g["heads"], g["head_axis"]) for g in optimizer.param_groups}
    assert tags["q"] == ("muon", 4, 0) and tags["o"] == ("muon", 4, 1)
    assert tags["k"] == ("muon", 2, 0) and tags["v"] == ("muon", 2, 0)  # key/value heads, not query heads
    assert tags["mlp"] == ("muon", None, 0)  # whole matrices
    assert {tags[r][0] for r in ("embed", "norm", "head")} == {"adamw"}
    assert all(g["weight_decay"] == (0.1 if g["role"] != "norm" else 0.0) for g in optimizer.param_groups)

    def run(out, max_steps, resume=False) -> dict[str, torch.Tensor]:
        model = _llama()
        args = _muon_args(out, max_steps=6, save_steps=3, save_strategy="steps")
        optimizer = create_muon_optimizer(model, args, per_head="q,k,v,o")
        trainer = tf.Trainer(model=model, args=args, train_dataset=_Tokens(), optimizers=(optimizer, None))
        if max_steps < 6:  # stop after the checkpoint at step 3, as a crash would
            trainer.add_callback(_StopAt(max_steps))
        trainer.train(resume_from_checkpoint=resume or None)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    straight = run(tmp_path / "straight", 6)
    first = _llama().state_dict()
    assert any(not torch.equal(straight[k], first[k]) for k in straight)  # it trained
    run(tmp_path / "stopped", 3)
    resumed = run(tmp_path / "stopped", 6, resume=True)
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key


class _StopAt(tf.TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        control.should_training_stop = state.global_step >= self.step
        return control


def test_muon_for_the_trainer_refuses_what_it_cannot_split(tmp_path) -> None:
    from qkvlab.errors import UserError
    from qkvlab.hf import create_muon_optimizer

    args = _muon_args(tmp_path)
    with pytest.raises(UserError, match="accepted: a subset of q, k, v, o"):
        create_muon_optimizer(_llama(), args, per_head="q,x")
    with pytest.raises(UserError, match="adjust_lr"):
        create_muon_optimizer(_llama(), args, adjust_lr="rms")
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_head=4, n_layer=1, n_positions=16))
    with pytest.raises(UserError, match="Conv1D"):  # W_O is (in, out) there: its heads are rows, not columns
        create_muon_optimizer(gpt2, args, per_head="o")
    with pytest.raises(UserError, match="fused qkv"):  # GPT-2 has no separate q projection
        create_muon_optimizer(gpt2, args, per_head="q")
    whole = create_muon_optimizer(gpt2, args)  # whole matrices are fine, Conv1D or not
    qkv = {(g["algorithm"], g["params"][0].ndim) for g in whole.param_groups if g["role"] == "qkv"}
    assert qkv == {("muon", 2), ("adamw", 1)}  # the fused weight by Muon, its bias by AdamW


class _Record(tf.TrainerCallback):
    """(role, lr, weight_decay, base) of every group at each optimiser step, as the step used them."""

    def __init__(self) -> None:
        self.steps: list[list[tuple]] = []
        self.optimizer = None

    def on_optimizer_step(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.steps.append(
            [
                (g["role"], g["lr"], g["weight_decay"], g["base_weight_decay"])
                for g in self.optimizer.param_groups
            ]
        )


@pytest.mark.parametrize("muon", [False, True])
def test_corrected_weight_decay_in_the_trainer_follows_its_schedule(tmp_path, muon) -> None:
    """λ_t = λ·η_t/η_max at every step for the corrected roles (η_max the schedule's peak), λ for the rest,
    under the Trainer's own warm-up + cosine schedule, for AdamW and for Muon."""
    from qkvlab.hf import create_muon_optimizer

    args = _muon_args(tmp_path, max_steps=6, warmup_steps=2, lr_scheduler_type="cosine", save_strategy="no")
    model = _llama()
    make = create_muon_optimizer if muon else create_optimizer
    optimizer = make(model, args, corrected_weight_decay="q,k")
    record = _Record()
    record.optimizer = optimizer
    trainer = tf.Trainer(model=model, args=args, train_dataset=_Tokens(), optimizers=(optimizer, None))
    trainer.add_callback(record)
    trainer.train()
    assert len(record.steps) == 6
    lrs = {round(lr / 3e-3, 6) for step in record.steps for role, lr, _, _ in step if role == "q"}
    assert len(lrs) >= 5 and max(lrs) == 1.0  # the schedule moved η, and its peak is η_max
    for step in record.steps:
        for role, lr, decay, base in step:
            want = base * lr / 3e-3 if role in ("q", "k") else base
            assert decay == pytest.approx(want, rel=1e-12, abs=1e-15), (role, lr, decay, base)
    assert any(base == 0.1 for step in record.steps for role, _, _, base in step if role == "q")


def test_corrected_weight_decay_in_the_trainer_refuses_coupled_optimisers_and_unknown_roles(tmp_path) -> None:
    from qkvlab.errors import UserError

    with pytest.raises(UserError, match="needs decoupled decay"):
        create_optimizer(_llama(), _muon_args(tmp_path, optim="sgd"), corrected_weight_decay="q")
    with pytest.raises(UserError, match="no trainable group has role x"):
        create_optimizer(_llama(), _muon_args(tmp_path), corrected_weight_decay="q,x")


def test_spectra_callback_resumes_its_monitor_from_the_trainers_checkpoint(tmp_path) -> None:
    """The predicted rate's accumulator and the last firing's per-head values travel in trainer_state.json:
    a resumed Trainer writing to a fresh folder measures step 6 exactly as an uninterrupted one."""

    def run(out, max_steps: int, resume=None) -> None:
        torch.manual_seed(0)
        model = _model()
        model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        args = tf.TrainingArguments(
            output_dir=str(out),
            learning_rate=1e-2,
            weight_decay=0.1,
            lr_scheduler_type="constant",
            max_steps=max_steps,
            per_device_train_batch_size=8,
            logging_steps=100,
            report_to=[],
            save_strategy="steps",
            save_steps=4,
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        )
        trainer = tf.Trainer(
            model=model, args=args, train_dataset=_Toy(), optimizers=(create_optimizer(model, args), None)
        )
        SpectraCallback.install(trainer, every_n_steps=3)
        trainer.train(resume_from_checkpoint=resume)

    run(tmp_path / "whole", 8)
    run(tmp_path / "first", 4)
    run(tmp_path / "resumed", 8, resume=str(tmp_path / "first" / "checkpoint-4"))
    expected = [json.loads(x) for x in (tmp_path / "whole" / "spectra.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in (tmp_path / "resumed" / "spectra.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == [6]
    (six,) = [r for r in expected if r["step"] == 6]
    for block in ("imbalance_decay_per_step", "gap_decay_per_step"):
        assert got[0][block] == six[block]
    assert got[0]["imbalance_decay_per_step"]["measured"]["qk"] is not None
