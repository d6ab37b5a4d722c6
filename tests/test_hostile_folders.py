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
    """The one error line (progress bars of model loading may come before it), and no traceback."""
    err = capsys.readouterr().err
    lines = [x for x in err.strip().splitlines() if not x.startswith("Loading weights")]
    assert len(lines) == 1 and "Traceback" not in err, lines
    return lines[0]


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


# -- issue 28's tracebacks, each now one line -------------------------------------------------------


@pytest.fixture(scope="module")
def place(tmp_path_factory, tiny_bert) -> Path:
    import pickle
    import shutil

    place = tmp_path_factory.mktemp("round3")
    (place / "corpus.txt").write_text(TEXT)
    (place / "three.csv").write_text("text,label\na,pos\nb,neg\nc,pos\n")
    (place / "three.jsonl").write_text(
        "".join(f'{{"text": "{t}", "label": "{y}"}}\n' for t, y in ("ab", "ba", "ab"))
    )
    (place / "thirty.csv").write_text("text,label\n" + "".join(f"x{i},c{i}\n" for i in range(30)))
    (place / "objects.jsonl").write_text(
        "".join(f'{{"text": "t{i}", "label": {{"a": {i % 2}}}}}\n' for i in range(40))
    )
    shutil.copytree(tiny_bert, place / "pickled")
    (place / "pickled" / "model.safetensors").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    (place / "empty").mkdir()
    (place / "inspect-broken.json").write_text(json.dumps({"kind": "inspect", "schema_version": 2}))
    run = place / "badmetrics"
    assert (
        main(["train", *(f"{k}={v}" for k, v in tiny_gpt_settings(place / "corpus.txt", run).items())]) == 0
    )
    (run / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1.0}\n{not json\n')
    garbled = place / "garbled-finetune" / "runs" / "x"
    garbled.mkdir(parents=True)
    (garbled / "run.json").write_text(
        json.dumps({"point": {"data": "d", "targets": ["q"], "method": "lora", "lr_ratio": 1}, "seed": 0})
    )
    (garbled / "result.json").write_text("{garbled")
    return place


LONG = "n" * 300
CASES = {
    # huge numbers
    "finetune seed": (["finetune", "--seed", "99999999999999999999999", "--max-steps", "1"], "--seed"),
    "sweep seeds": (["sweep", "--seeds", "99999999999999999999", "--grid", "lr=1e-3"], "--seeds"),
    "train seed": (["train", "seed=99999999999999999999"], "seed="),
    "theory steps": (["theory", "--steps", "99999999999999999999", "--parts", "toy"], "steps"),
    "n_head": (["train", "model.n_head=5000000"], "model.n_head=5000000"),
    "lora rank": (
        ["finetune", "--model", "{bert}", "--data", "csv:{csv}", "--rank", "99999999999999999999"],
        "--rank",
    ),
    "batch size": (
        ["finetune", "--model", "{bert}", "--data", "csv:{csv}", "--batch-size", "100000"],
        "--batch-size",
    ),
    # tiny and odd data files
    "3 csv rows": (["finetune", "--model", "{bert}", "--data", "csv:{p}/three.csv"], "split empty"),
    "3 jsonl lines": (["finetune", "--model", "{bert}", "--data", "jsonl:{p}/three.jsonl"], "split empty"),
    "30 classes": (["finetune", "--model", "{bert}", "--data", "csv:{p}/thirty.csv"], "split empty"),
    "object label": (["finetune", "--model", "{bert}", "--data", "jsonl:{p}/objects.jsonl"], "JSON object"),
    "pickle as safetensors": (
        ["finetune", "--model", "{p}/pickled", "--data", "csv:{csv}"],
        "not a safetensors file",
    ),
    # outputs that cannot be written
    "train out /proc": (["train", "out=/proc/nope/x"], "cannot write /proc/nope/x"),
    "train out long": (["train", "out={p}/" + LONG], "at most 255 bytes"),
    "train out space": (["train", "out={p}/run "], "white space"),
    "sweep out": (["sweep", "--grid", "lr=1e-3", "--out", "/proc/nope/s"], "cannot write"),
    "finetune out": (["finetune", "--out", "{p}/" + LONG], "at most 255 bytes"),
    "inspect json": (["inspect", "{bert}", "--json", "/proc/nope/x.json"], "cannot write"),
    "inspect csv": (["inspect", "{bert}", "--csv", "{p}/" + LONG + ".csv"], "at most 255 bytes"),
    "inspect plot": (["inspect", "{bert}", "--plot", "/proc/nope/plots"], "cannot write"),
    "theory json": (["theory", "--parts", "toy", "--json", "/proc/nope/t.json"], "cannot write"),
    "theory plot": (["theory", "--parts", "toy", "--plot", "{p}/" + LONG], "at most 255 bytes"),
    "report out": (["report", "{p}/badmetrics", "--out", "/proc/nope/r"], "cannot write"),
    "repro out": (["repro", "wd-rank", "--out", "/proc/nope/w"], "cannot write"),
    "demo out": (["demo", "--out", "{p}/" + LONG], "at most 255 bytes"),
    # summaries and reports of damaged or empty folders
    "optimizer-rank none": (
        ["repro", "optimizer-rank", "--summary-only", "--out", "/nonexistent"],
        "holds no runs",
    ),
    "wd-rank empty": (["repro", "wd-rank", "--summary-only", "--out", "{p}/empty"], "holds no runs"),
    "decouple empty": (["repro", "decouple", "--summary-only", "--out", "{p}/empty"], "holds no runs"),
    "finetune garbled": (
        ["repro", "finetune", "--summary-only", "--out", "{p}/garbled-finetune"],
        "is damaged",
    ),
    "report inspect": (
        ["report", "{p}/inspect-broken.json", "--out", "{p}/r1"],
        "inspect-broken.json is damaged",
    ),
    "report metrics": (["report", "{p}/badmetrics", "--out", "{p}/r2"], "line 2 is not JSON"),
    # a sweep that would train and then fail
    "sweep repeated value": (["sweep", "--grid", "lr=1e-3,0.001", "--out", "{p}/sw"], "twice"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_case_of_the_probe_is_one_line_exit_2(
    case, place, tiny_bert, tiny_csv, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(place)
    argv, expected = CASES[case]
    argv = [a.format(p=place, bert=tiny_bert, csv=tiny_csv) for a in argv]
    if argv[0] in ("train", "sweep") and not any(a.startswith("data=") for a in argv):
        argv += [f"data=text:{place / 'corpus.txt'}", "seq_len=16", "max_steps=2", "warmup_steps=0"]
    assert main(argv) == 2
    assert expected in _one_line(capsys)
    assert not (place / "sw").exists() and not list(place.glob("r1")) and not list(place.glob("r2"))


def test_a_plot_of_a_run_too_short_to_fit_a_rate_is_drawn(tmp_path, capsys) -> None:
    assert (
        main(["theory", "--parts", "toy", "--steps", "5", "--plot", str(tmp_path / "plots"), "--quiet"]) == 0
    )
    assert (tmp_path / "plots" / "theory_rates.png").stat().st_size > 0


def test_disk_full_under_sweep_and_finetune_is_one_line_naming_the_file(
    corpus, tiny_bert, tiny_csv, tmp_path, capsys, monkeypatch
) -> None:
    import errno

    from qkvlab.train import checkpoint

    def full(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "sw" / "x.safetensors"))

    monkeypatch.setattr(checkpoint, "save_model", full)
    settings = tiny_gpt_settings(corpus, tmp_path / "x", max_steps=4)
    args = [f"{k}={v}" for k, v in settings.items() if k != "out"]
    assert main(["sweep", "--grid", "lr=1e-3,2e-3", "--out", str(tmp_path / "sw"), *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"qkvlab sweep: error: cannot write: {tmp_path / 'sw' / 'x.safetensors'}: No space left on device"
    ]
    monkeypatch.undo()

    import transformers

    class SafetensorError(Exception):  # what safetensors raises for a failed write
        __module__ = "safetensors_rust"

    def fails(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", fails)
    out = tmp_path / "ft"
    argv = [
        "finetune",
        "--model",
        str(tiny_bert),
        "--data",
        f"csv:{tiny_csv}",
        "--max-steps",
        "1",
        "--out",
        str(out),
    ]
    assert main(argv) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"qkvlab finetune: error: cannot write: {out / 'model'}: No space left on device"
    )


def test_a_data_file_with_300_kB_fields_loads(tmp_path) -> None:
    """CSV's default field limit (128 kB) made a long review a parse error; it is cut to --max-length later."""
    from qkvlab.finetune.data import load_labelled

    path = tmp_path / "long.csv"
    path.write_text("text,label\n" + "".join(f"{'word ' * 60_000},{i % 2}\n" for i in range(40)))
    data = load_labelled(f"csv:{path}")
    assert len(data.texts) == 40 and len(data.texts[0]) == 300_000 and data.num_labels == 2


@pytest.mark.parametrize(
    "argv, hint",
    [
        (["train", "--lr", "3e-4"], "did you mean lr=3e-4"),
        (["train", "--max-steps=5"], "did you mean max_steps=5"),
        (["sweep", "--grid", "lr=1e-3", "--weight-decay", "0.1"], "did you mean weight_decay=0.1"),
    ],
)
def test_an_option_named_like_a_config_key_says_how_to_write_it(argv, hint, capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert hint in _one_line(capsys)


def _settings_only(source: Path, dest: Path) -> Path:
    """A copy of a committed results folder's settings.json and summary.json: what tells its kind."""
    dest.mkdir(parents=True)
    for name in ("settings.json", "summary.json"):
        if (source / name).is_file():
            (dest / name).write_bytes((source / name).read_bytes())
    (dest / "runs").mkdir()
    return dest


RESULTS = Path(__file__).resolve().parents[1] / "results"


@pytest.mark.parametrize(
    ("folder", "argv", "says"),
    [
        ("paper000-recall", ["logits"], "holds `qkvlab repro wd-rank` results"),
        (
            "paper000-recall",
            ["optimizer-rank", "--setting", "recall"],
            "holds `qkvlab repro wd-rank` results",
        ),
        ("paper000-recall", ["rank-guard"], "holds `qkvlab repro wd-rank` results"),
        ("optimizer-rank-recall", ["wd-rank", "--setting", "recall"], "holds `qkvlab repro optimizer-rank`"),
        ("optimizer-rank-recall", ["decouple"], "holds `qkvlab repro optimizer-rank` results"),
        ("paper000-recall", ["wd-rank", "--setting", "gpt"], "holds the 'recall' setting's runs, not 'gpt'"),
        ("paper000-recall", ["decouple"], "holds the 'recall' setting's runs, not 'gpt'"),
        (
            "optimizer-rank-recall",
            ["optimizer-rank", "--setting", "gpt"],
            "holds the 'recall' setting's runs",
        ),
    ],
)
def test_a_results_folder_of_another_claim_or_setting_is_refused_and_left_as_it_was(
    folder, argv, says, tmp_path, capsys
) -> None:
    out = _settings_only(RESULTS / folder, tmp_path / folder)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(["repro", *argv, "--out", str(out), "--summary-only"]) == 2
    line = _one_line(capsys)
    assert says in line and "accepted:" in line, line
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # summary.json untouched


def test_rank_guard_refuses_a_reference_that_is_not_the_shakespeare_gpts(tmp_path, capsys) -> None:
    reference = _settings_only(RESULTS / "optimizer-rank-recall", tmp_path / "reference")
    argv = ["repro", "rank-guard", "--reference", str(reference), "--out", str(tmp_path / "guard")]
    assert main(argv) == 2
    assert "is not a `repro wd-rank` or `decouple` folder of this run's model and data" in _one_line(capsys)
    assert not (tmp_path / "guard" / "runs").exists()  # refused before any run
