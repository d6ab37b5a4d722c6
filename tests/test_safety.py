"""Promise 3 of RELIABILITY.md: no code runs from a file. Weights come from safetensors only; a real
malicious pickle (it creates a file when unpickled) is refused by every command that takes a path,
in one line and without being unpickled."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest

from qkvlab.cli import main

from conftest import tiny_gpt_settings


class _Payload:
    """Unpickling this object calls open(SENTINEL, "w"): the file appearing means code ran."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = str(sentinel)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.sentinel, "w"))


@pytest.fixture
def pickled_model(tmp_path, tiny_bert) -> tuple[Path, Path]:
    """A HF folder with a real config and tokenizer, whose only weights are a malicious pickle."""
    folder = tmp_path / "evil"
    shutil.copytree(tiny_bert, folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    sentinel = tmp_path / "pwned"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(sentinel)))
    return folder, sentinel


def test_the_payload_is_real(tmp_path) -> None:
    sentinel = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Payload(sentinel))).close()  # proving the payload works
    assert sentinel.exists()


def test_every_command_refuses_pickled_weights(pickled_model, tiny_bert, tiny_csv, tmp_path, capsys) -> None:
    folder, sentinel = pickled_model
    commands = [
        ["inspect", str(folder)],
        ["inspect", str(folder / "pytorch_model.bin")],
        ["inspect", str(tiny_bert), "--compare", str(folder)],
        ["finetune", "--model", str(folder), "--data", f"csv:{tiny_csv}", "--max-steps", "1", "--no-save"],
        ["theory", "--parts", "pretrained", "--model", str(folder), "--quiet"],
        ["report", str(folder / "pytorch_model.bin")],
    ]
    for command in commands:
        capsys.readouterr()
        assert main(command) == 2, command
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"qkvlab {command[0]}: error:"), (command, err)
        assert not sentinel.exists(), f"{command} ran code from the pickle"
    refused = main_error(["inspect", str(folder)], capsys)
    assert "weights_only=True" in refused and "never runs a full unpickle" in refused


@pytest.mark.parametrize("zipped", [True, False], ids=["torch-zip", "legacy"])
def test_a_torch_checkpoint_carrying_a_payload_never_runs_it(zipped, tmp_path, capsys) -> None:
    """Torch checkpoints (nanoGPT's ckpt.pt, pytorch_model.bin) are read only through torch.load(weights_only=True):
    a payload inside one, in torch's zip format or the legacy one, is refused in one line and never runs."""
    import torch

    sentinel = tmp_path / "pwned"
    checkpoint = tmp_path / "ckpt.pt"
    torch.save(
        {"model": {"w": torch.zeros(2, 2)}, "model_args": _Payload(sentinel)},
        checkpoint,
        _use_new_zipfile_serialization=zipped,
    )
    for command in (
        ["inspect", str(checkpoint)],
        ["inspect", str(checkpoint), "--compare", str(checkpoint)],
    ):
        capsys.readouterr()
        assert main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "weights_only=True" in err[0], err
    assert not sentinel.exists()


def main_error(command: list[str], capsys) -> str:
    capsys.readouterr()
    main(command)
    return capsys.readouterr().err


def test_a_pickle_in_place_of_a_checkpoint_is_not_loaded(tmp_path, capsys) -> None:
    from qkvlab.config import load_config
    from qkvlab.train import train

    corpus = tmp_path / "c.txt"
    corpus.write_text("To be, or not to be, that is the question. " * 80)
    run = tmp_path / "run"
    settings = tiny_gpt_settings(
        corpus, run, max_steps=8, stop_at=4, eval_every=0, spectra_every=0, **{"model.n_layer": 1}
    )
    train(load_config(None, settings))
    sentinel = tmp_path / "pwned"
    checkpoint = run / "checkpoint-00000004"
    for name in ("model.safetensors", "optimizer.safetensors"):
        (checkpoint / name).write_bytes(pickle.dumps(_Payload(sentinel)))
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    assert "can be resumed" in capsys.readouterr().err and not sentinel.exists()


def test_yaml_configs_cannot_construct_objects(tmp_path, capsys) -> None:
    sentinel = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f'lr: !!python/object/apply:builtins.open ["{sentinel}", "w"]\n')
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not valid YAML" in err[0] and not sentinel.exists()
