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

    logged = [entry for entry in trainer.state.log_history if "spectra/qk_erank_mean" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    assert "spectra/L1/ov_gap_mean" in logged[0]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = (tmp_path / "runs").iterdir()  # the Trainer's own TensorBoard folder
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/spectra/qk_erank_mean" in tags or "spectra/qk_erank_mean" in tags, tags
    tag = "train/spectra/qk_erank_mean" if "train/spectra/qk_erank_mean" in tags else "spectra/qk_erank_mean"
    assert [e.step for e in events.Scalars(tag)] == [2, 4]


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
