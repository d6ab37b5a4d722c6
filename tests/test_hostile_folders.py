"""Promises 10 and 11 of RELIABILITY.md: a folder from someone else cannot make qkvlab write outside the
folder the user named (no symbolic link is followed for a write), a damaged run file is one line, and
the reports are inert (no string from a file or folder name is live HTML in either twin)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qkvlab.cli import main
from qkvlab.config import load_config
from qkvlab.files import LinkRefused, open_append, refuse_links, write_atomic
from qkvlab.train import train

from conftest import tiny_gpt_settings

TEXT = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.\n" * 40


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "sonnet.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture
def outside(tmp_path) -> Path:
    """A file outside every folder qkvlab is told to write into; it must never change."""
    path = tmp_path / "elsewhere" / "precious.txt"
    path.parent.mkdir()
    path.write_text("keep me\n")
    return path


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("name", [".lock", "metrics.jsonl", "config.json", "spectra.jsonl", "latest"])
def test_a_link_planted_in_a_run_folder_is_refused_and_nothing_outside_changes(
    name, corpus, tmp_path, outside, capsys
) -> None:
    run = tmp_path / "run"
    train(load_config(None, tiny_gpt_settings(corpus, run, stop_at=4)))
    (run / name).unlink(missing_ok=True)
    (run / name).symlink_to(outside)
    assert main(["train", "--resume", str(run)]) == 2
    line = _one_line(capsys)
    assert f"{run / name} is a symbolic link (to {outside})" in line and "never writes through a link" in line
    assert outside.read_text() == "keep me\n"


def test_a_linked_subfolder_of_a_grid_is_refused(corpus, tmp_path, outside, capsys) -> None:
    out = tmp_path / "grid"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "lr0.001_seed0").symlink_to(outside.parent, target_is_directory=True)
    settings = tiny_gpt_settings(corpus, out / "x")
    args = [f"{k}={v}" for k, v in settings.items() if k != "out"]
    assert main(["sweep", "--out", str(out), "--grid", "lr=1e-3", *args]) == 2
    assert "is a symbolic link" in _one_line(capsys)
    assert sorted(p.name for p in outside.parent.iterdir()) == ["precious.txt"]


def test_the_writer_replaces_a_link_and_the_appender_refuses_one(tmp_path, outside) -> None:
    target = tmp_path / "out.json"
    target.symlink_to(outside)
    write_atomic(target, "{}")
    assert not target.is_symlink() and target.read_text() == "{}" and outside.read_text() == "keep me\n"
    log = tmp_path / "metrics.jsonl"
    log.symlink_to(outside)
    with pytest.raises(LinkRefused, match=r"metrics\.jsonl is a symbolic link"):
        open_append(log)
    assert outside.read_text() == "keep me\n"
    refuse_links(tmp_path / "nope")  # a folder that does not exist holds no link
    with pytest.raises(LinkRefused):
        refuse_links(tmp_path)
    # the folder the user names may itself be a link: that is their choice
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    refuse_links(tmp_path / "alias")


def test_inspect_outputs_do_not_follow_links(tiny_bert, tmp_path, outside) -> None:
    json_out, csv_out = tmp_path / "r.json", tmp_path / "r.csv"
    json_out.symlink_to(outside)
    csv_out.symlink_to(outside)
    assert main(["inspect", str(tiny_bert), "--json", str(json_out), "--csv", str(csv_out)]) == 0
    assert outside.read_text() == "keep me\n"
    assert json.loads(json_out.read_text())["kind"] == "inspect" and csv_out.read_text().startswith("layer,")


def test_the_disk_full_message_names_the_output_file(tmp_path, monkeypatch) -> None:
    import errno

    def full(fd):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as fsync reports delayed allocation

    real = tmp_path / "x.json"
    real.write_text("old")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as caught:
        write_atomic(real, "x" * 100_000)
    assert caught.value.filename == str(real) and caught.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert real.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"lr": 0.001, "max_st', b"[1, 2]", b"\xff\xfe\x00garbage\x80", b'"a string"'],
    ids=["garbled", "truncated", "list", "binary", "string"],
)
def test_a_damaged_config_json_on_resume_is_one_line(content, corpus, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    train(load_config(None, tiny_gpt_settings(corpus, run, stop_at=4)))
    (run / "config.json").write_bytes(content)
    assert main(["train", "--resume", str(run)]) == 2
    line = _one_line(capsys)
    assert f"{run / 'config.json'} is damaged" in line, line


def test_a_binary_metrics_file_on_resume_is_one_line(corpus, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    train(load_config(None, tiny_gpt_settings(corpus, run, stop_at=4)))
    (run / "metrics.jsonl").write_bytes(b"\x00\xff\xfe" * 50)
    assert main(["train", "--resume", str(run)]) == 2
    assert "metrics.jsonl is damaged (not UTF-8 text)" in _one_line(capsys)
