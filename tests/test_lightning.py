"""qkvlab.lightning: the callbacks under a real ``lightning.Trainer.fit`` on a tiny BERT, resumed from a
Lightning checkpoint."""

from __future__ import annotations

import csv
import json
import math

import lightning.pytorch as pl  # the lightning extra, which make test installs
import pytest
import torch

import qkvlab
from qkvlab.lightning import RankGuardCallback, SpectraCallback

from conftest import tiny_bert_classifier


class _Data(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 32  # 4 batches: the checkpoint at step 4 ends an epoch, so a resume sees the same batches

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(i)
        ids = torch.randint(1, 64, (12,), generator=gen)
        return {"input_ids": ids, "labels": ids[0] % 2}


class _Module(pl.LightningModule):
    def __init__(self, per_layer: str = "") -> None:
        super().__init__()
        self.model = tiny_bert_classifier()
        self.per_layer = per_layer

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        return self.model(**batch).loss

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        groups = qkvlab.param_groups(self, lr=1e-2, weight_decay=0.1, per_layer=self.per_layer)
        optimizer = torch.optim.AdamW(groups)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / 20)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def train_dataloader(self):  # type: ignore[no-untyped-def]
        return torch.utils.data.DataLoader(_Data(), batch_size=8)


def _fit(root, max_steps: int, callbacks: list, ckpt_path=None, per_layer: str = "") -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        default_root_dir=root,
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=pl.loggers.CSVLogger(root, name="", version=""),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(_Module(per_layer), ckpt_path=ckpt_path)
    return trainer


def _series(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_spectra_callback_logs_the_series_and_every_layer_to_the_loggers(tmp_path) -> None:
    trainer = _fit(tmp_path, 6, [SpectraCallback(every_n_steps=2)])
    # the logit ceiling's hooks are removed when training ends
    assert not any(m._forward_pre_hooks for m in trainer.lightning_module.modules())
    records = _series(tmp_path / "spectra.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all(r["series_version"] == 1 for r in records)
    # the prediction is read from the module's own optimiser: 2·η·λ over each interval's steps
    lrs = [1e-2 * (1 - s / 20) for s in range(6)]
    for record, interval in zip(records, (lrs[0:2], lrs[2:4], lrs[4:6]), strict=True):
        predicted = record["imbalance_decay_per_step"]["predicted_weight_decay_part"]["qk"]
        assert predicted == pytest.approx(sum(2 * 0.1 * lr for lr in interval) / 2)
    assert records[1]["imbalance_decay_per_step"]["measured"]["ov"] is not None
    with open(tmp_path / "metrics.csv") as fh:
        rows = [row for row in csv.DictReader(fh) if row.get("spectra/L1/qk_erank_min")]
    assert [int(row["step"]) for row in rows] == [2, 4, 6]
    assert rows[0]["spectra/ov_imbalance_decay_measured"] == ""  # nothing to measure against at the first
    assert float(rows[1]["spectra/ov_imbalance_decay_measured"]) == pytest.approx(
        records[1]["imbalance_decay_per_step"]["measured"]["ov"]
    )
    # the logit ceiling from the module's weights and the inputs of the steps before each firing
    assert all(r["logit_ceiling"]["ceiling"] for r in records)
    assert [float(row["logits/ceiling"]) for row in rows] == pytest.approx(
        [max(max(layer) for layer in r["logit_ceiling"]["ceiling"]) for r in records]
    )


def test_resuming_from_a_lightning_checkpoint_continues_exactly(tmp_path) -> None:
    _fit(tmp_path / "whole", 8, [SpectraCallback(every_n_steps=3)])
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    _fit(tmp_path / "first", 4, [SpectraCallback(every_n_steps=3), checkpoint])
    (saved,) = (tmp_path / "ckpt").glob("*.ckpt")
    state = torch.load(saved, weights_only=False)["callbacks"]
    (ours,) = [v for k, v in state.items() if "SpectraCallback" in k]
    assert ours["monitor"]["steps"] == 1  # step 4 accumulated since the firing at step 3
    # a fresh folder: the previous firing's values come from the checkpoint alone
    _fit(tmp_path / "resumed", 8, [SpectraCallback(every_n_steps=3)], ckpt_path=saved)
    expected = [r for r in _series(tmp_path / "whole" / "spectra.jsonl") if r["step"] == 6]
    got = [r for r in _series(tmp_path / "resumed" / "spectra.jsonl") if r["step"] == 6]
    assert got and expected
    for block in ("imbalance_decay_per_step", "gap_decay_per_step"):
        assert got[0][block] == expected[0][block]
    assert got[0]["imbalance_decay_per_step"]["measured"]["qk"] is not None


def test_rank_guard_callback_moves_each_layers_decay_and_logs_it(tmp_path) -> None:
    spectra = SpectraCallback(every_n_steps=2)
    guard = RankGuardCallback(target_qk=0.9, every_n_steps=2)
    trainer = _fit(tmp_path, 2, [spectra, guard], per_layer="q,k,v,o")
    (record,) = _series(tmp_path / "spectra.jsonl")
    groups = trainer.optimizers[0].param_groups
    for layer in (0, 1):
        erank = min(
            h["effective_rank"] for h in record["heads"] if h["layer"] == layer and h["product"] == "qk"
        )
        expected = 0.1 * math.exp(2.0 * (erank - 0.9 * 8) / 8)  # the firing measured the same weights
        lams = {
            g.get("base_weight_decay", g["weight_decay"])
            for g in groups
            if g.get("layer") == layer and g["role"] in ("q", "k")
        }
        lams.discard(0.0)
        assert len(lams) == 1 and lams.pop() == pytest.approx(expected)
    with open(tmp_path / "metrics.csv") as fh:
        rows = [row for row in csv.DictReader(fh) if row.get("guard/L0/qk_lambda")]
    assert [int(r["step"]) for r in rows] == [2]
