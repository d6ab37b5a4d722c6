"""Paper 001's strategy through the HF Trainer: the second path beside ``qkvlab finetune``.

Train only W_q and W_v (here with LoRA on them; drop the PEFT lines for full fine-tuning), with
η_V = λ·η_QK, using the Trainer's own loop, schedule, logging and checkpointing. qkvlab only
builds the optimiser's parameter groups and, optionally, logs per-head spectra to TensorBoard.

    python examples/finetune_with_trainer.py --model minilm --data rotten-tomatoes --ratio 4

The same data, splits and metrics as ``qkvlab finetune`` (``qkvlab.finetune.load_labelled``).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
import transformers as tf
from peft import LoraConfig, get_peft_model

from qkvlab.finetune import load_classifier, load_labelled, target_modules
from qkvlab.finetune.metrics import classification_metrics, regression_metrics
from qkvlab.hf import SpectraCallback, create_optimizer


class Encoded(torch.utils.data.Dataset):
    """One split of a ``LabelledData``, tokenised (text and optional text pair), unpadded."""

    def __init__(self, tokenizer, data, split: str, max_length: int = 64) -> None:
        texts, pairs, self.labels = data.subset(split)
        self.encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)
        self.regression = data.regression

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        label = float(self.labels[i]) if self.regression else int(self.labels[i])
        return {**{k: v[i] for k, v in self.encoded.items()}, "labels": label}


def main(argv: list[str] | None = None) -> tf.Trainer:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--data", default="rotten-tomatoes")
    parser.add_argument("--lr", type=float, default=5e-4, help="η_QK")
    parser.add_argument("--ratio", type=float, default=4.0, help="λ: η_V = λ·η_QK")
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="runs/trainer-qv")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    data = load_labelled(args.data)
    # a HF folder or a GGUF file (smollm2-135m …): GGUF weights dequantised, EOS as the pad where there is none
    tokenizer, model, _ = load_classifier(args.model, data.num_labels)
    # LoRA on the q and v projections, whatever this architecture calls them (query/value, q_proj/v_proj, …)
    modules = target_modules(model, {"q", "v"})
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=modules, task_type="SEQ_CLS"))
    training = tf.TrainingArguments(
        output_dir=args.out,
        learning_rate=args.lr,
        weight_decay=0.0,
        max_steps=args.max_steps,
        warmup_steps=int(0.06 * args.max_steps),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=2 * args.batch_size,
        eval_strategy="steps",
        eval_steps=max(1, args.max_steps // 6),
        logging_steps=max(1, args.max_steps // 6),
        save_strategy="no",
        report_to=["tensorboard"],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    # the one qkvlab line: V's groups get λ × the Trainer's learning rate; biases and norms undecayed
    optimizer = create_optimizer(model, training, preset="qv-ratio", preset_args={"ratio": args.ratio})

    def metrics(prediction: tf.EvalPrediction) -> dict:
        if data.regression:
            return regression_metrics(prediction.predictions[:, 0], prediction.label_ids)
        return classification_metrics(
            np.argmax(prediction.predictions, -1), prediction.label_ids, data.num_labels
        )

    trainer = tf.Trainer(
        model=model,
        args=training,
        train_dataset=Encoded(tokenizer, data, "train"),
        eval_dataset=Encoded(tokenizer, data, "val"),
        data_collator=tf.DataCollatorWithPadding(tokenizer),
        compute_metrics=metrics,
        optimizers=(optimizer, None),  # the Trainer builds its schedule around our groups
    )
    SpectraCallback.install(trainer, every_n_steps=max(1, args.max_steps // 3))  # spectra → TensorBoard
    trainer.train()  # validation split: the learning curve, every eval_steps
    result = trainer.evaluate(Encoded(tokenizer, data, "test"), metric_key_prefix="test")  # once, at the end
    print({k: round(v, 4) for k, v in result.items() if k.startswith("test_")})
    return trainer


if __name__ == "__main__":
    main()
