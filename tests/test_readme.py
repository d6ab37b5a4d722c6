"""Every Python snippet of README.md and docs/control.md runs, in order, with small stand-ins for the
user's model, data and LightningModule, so the documentation cannot rot."""

from __future__ import annotations

import json
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import transformers as tf

from conftest import tiny_bert_classifier

ROOT = Path(__file__).resolve().parents[1]


def snippets(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


class _Items(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 64, (n, 12), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i, 0] % 2}


def _bert() -> tf.PreTrainedModel:
    return tiny_bert_classifier()


class _Module(pl.LightningModule):
    """A user's LightningModule: an HF model inside, its own optimiser."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _bert()

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        return self.model(**batch).loss

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.1)

    def train_dataloader(self):  # type: ignore[no-untyped-def]
        return torch.utils.data.DataLoader(_Items(34 * 4), batch_size=4)


def _nanogpt_checkpoint(path: Path) -> None:
    """nanoGPT's ckpt.pt, as its train.py writes it (compiled: `_orig_mod.` prefixes), at a small width."""
    from torch import nn

    d, heads, layers = 48, 6, 2
    torch.manual_seed(0)
    state = {}
    for i in range(layers):
        state[f"_orig_mod.transformer.h.{i}.attn.c_attn.weight"] = nn.Linear(d, 3 * d).weight.detach()
        state[f"_orig_mod.transformer.h.{i}.attn.c_proj.weight"] = nn.Linear(d, d).weight.detach()
        state[f"_orig_mod.transformer.h.{i}.mlp.c_fc.weight"] = nn.Linear(d, 4 * d).weight.detach()
    state["_orig_mod.transformer.wte.weight"] = torch.randn(65, d)
    path.parent.mkdir(parents=True)
    args = {
        "n_layer": layers,
        "n_head": heads,
        "n_embd": d,
        "block_size": 64,
        "bias": False,
        "vocab_size": 65,
    }
    torch.save(
        {
            "model": state,
            "optimizer": {},
            "model_args": args,
            "iter_num": 5000,
            "best_val_loss": torch.tensor(1.5),
        },
        path,
    )


def _stand_ins() -> dict:
    items = _Items(100 * 4)
    return {
        "model": _bert(),
        "loader": [
            {k: torch.stack([items[j][k] for j in range(4 * i, 4 * i + 4)]) for k in items[0]}
            for i in range(100)
        ],
        "batch": {"input_ids": items.ids[:4], "labels": items.ids[:4, 0] % 2},
        "train": _Items(17 * 8),  # 17 steps an epoch at the Trainer's batch of 8: 51 steps in its 3 epochs
        "module": _Module(),
        "A": torch.randn(4, 16, 8),
        "B": torch.randn(4, 12, 8),
    }


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_every_readme_snippet_runs_and_writes_what_it_says(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _nanogpt_checkpoint(tmp_path / "out-shakespeare-char" / "ckpt.pt")
    found = snippets(ROOT / "README.md")
    assert len(found) >= 5
    namespace = _stand_ins()
    for number, code in enumerate(found, 1):
        exec(compile(code, f"README.md python snippet {number}", "exec"), namespace)
    # what the snippets' comments promise
    assert _steps(tmp_path / "runs" / "mine" / "spectra.jsonl") == [0, 100]
    assert (tmp_path / "runs" / "mine" / "tb").is_dir() and (
        tmp_path / "runs" / "mine" / "monitor.pt"
    ).is_file()
    assert _steps(tmp_path / "out" / "spectra.jsonl") == [50]
    (lightning_series,) = (tmp_path / "lightning_logs").glob("version_*/spectra.jsonl")
    assert _steps(lightning_series) == [100]
    assert json.loads((tmp_path / "at5000.json").read_text())["architecture"]["family"] == "nanogpt"
    from qkvlab.cli import main

    # "qkvlab report runs/mine out" draws the runs overlaid
    assert main(["report", "runs/mine", "out", "--out", "page"]) == 0
    assert "## 2 runs overlaid" in (tmp_path / "page" / "report.md").read_text()


@pytest.mark.parametrize("doc", ["docs/control.md"])
def test_every_snippet_of_the_control_guide_runs(doc, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    found = snippets(ROOT / doc)
    assert len(found) >= 5
    namespace = _stand_ins()
    # the guide's models are the real MiniLM: a few steps do
    namespace["loader"], namespace["train"] = namespace["loader"][:3], _Items(16)
    for number, code in enumerate(found, 1):
        exec(compile(code, f"{doc} python snippet {number}", "exec"), namespace)
