"""`qkvlab inspect`: outputs in their fixed shape, and one-line errors with exit code 2."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import save_file

from qkvlab.cli import main
from qkvlab.inspection import METRICS

from conftest import tiny_hf_model


def test_inspect_minilm_writes_json_csv_and_plots(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    rc = main(
        [
            "inspect",
            "minilm",
            "--json",
            str(out / "m.json"),
            "--csv",
            str(out / "m.csv"),
            "--plot",
            str(out / "p"),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "minilm: bert, 6 layers, 12 heads (12 KV), d_model=384, d_head=32" in printed
    assert (
        len([line for line in printed.splitlines() if line.strip()[:1].isdigit()]) == 6
    )  # one row per layer

    data = json.loads((out / "m.json").read_text())
    assert set(data) == {
        "schema_version",
        "kind",
        "source",
        "architecture",
        "rtol",
        "notes",
        "rank_noise_limited",
        "heads",
        "precision",
    }
    assert data["kind"] == "inspect"
    # MiniLM is stored in float32, so auto keeps Householder QR; its stated bound is rounding-level
    assert data["precision"]["method"] == "qr"
    assert 0 < data["precision"]["relative_error_bound"] < 1e-12
    assert data["architecture"] == {
        "family": "bert",
        "n_layers": 6,
        "n_heads": 12,
        "n_kv_heads": 12,
        "d_model": 384,
        "d_head": 32,
    }
    assert data["rtol"] == 1e-3
    assert len(data["heads"]) == 6 * 12 * 2
    first = data["heads"][0]
    assert set(first) == {
        "attention",
        "layer",
        "head",
        "product",
        "singular_values",
        *METRICS,
        "left_gram",
        "right_gram",
    }
    assert (first["layer"], first["head"], first["product"]) == (0, 0, "qk")
    assert {(h["layer"], h["head"], h["product"]) for h in data["heads"]} == {
        (layer, head, p) for layer in range(6) for head in range(12) for p in ("qk", "ov")
    }
    for head in data["heads"]:
        sv = head["singular_values"]
        assert len(sv) == 32 and sv == sorted(sv, reverse=True)
        assert isinstance(head["rank"], int) and 0 <= head["rank"] <= 32
        assert 1.0 <= head["effective_rank"] <= 32.0
        assert head["gap"] >= 0 and head["gap"] == pytest.approx(head["l2_half"] - head["nuclear_norm"])

    with open(out / "m.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 144
    assert float(rows[0]["effective_rank"]) == pytest.approx(first["effective_rank"])
    assert len(rows[0]["singular_values"].split()) == 32

    for name in ("effective_rank_heatmap.png", "singular_values_qk.png", "singular_values_ov.png"):
        png = (out / "p" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_rtol_changes_rank_only(tmp_path) -> None:
    model = tiny_hf_model("bert")
    model.save_pretrained(tmp_path / "m")
    main(["inspect", str(tmp_path / "m"), "--json", str(tmp_path / "a.json"), "--quiet"])
    main(["inspect", str(tmp_path / "m"), "--json", str(tmp_path / "b.json"), "--quiet", "--rtol", "0.5"])
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert b["rtol"] == 0.5
    assert sum(h["rank"] for h in b["heads"]) < sum(h["rank"] for h in a["heads"])
    assert [h["effective_rank"] for h in a["heads"]] == [h["effective_rank"] for h in b["heads"]]


# -- bad input: one line, exit code 2, no traceback -------------------------------------


def _saved(tmp_path, kind="bert"):
    folder = tmp_path / kind
    tiny_hf_model(kind).save_pretrained(folder)
    return folder


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _bad_missing(tmp_path):
    return [str(tmp_path / "nope")], "no such file or folder"


def _bad_text_file(tmp_path):
    (tmp_path / "x.safetensors").write_text("this is not a tensor file at all")
    return [str(tmp_path / "x.safetensors")], "not a safetensors file"


def _bad_wrong_suffix(tmp_path):
    (tmp_path / "w.npy").write_bytes(b"\0" * 100)
    return [str(tmp_path / "w.npy")], "not a .safetensors file"


def _bad_torch_file(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"\0" * 100)  # a .bin that is no torch checkpoint either
    return [str(tmp_path / "w.bin")], r"torch's restricted loader \(weights_only=True\) refused it"


def _bad_garbage_in_folder(tmp_path):
    folder = _saved(tmp_path)
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    return [str(folder)], "not a safetensors file"


def _bad_truncated(tmp_path):
    folder = _saved(tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    return [str(folder)], "truncated"


def _bad_unsupported(tmp_path):
    import torch

    folder = tmp_path / "mamba"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mamba", "num_heads": 4}))
    save_file({"backbone.layers.0.mixer.in_proj.weight": torch.zeros(8, 8)}, folder / "model.safetensors")
    return [str(folder)], "unsupported architecture .* model_type 'mamba'.*supported families: bert"


def _bad_heads_do_not_divide(tmp_path):
    folder = _saved(tmp_path)
    _edit_config(folder, num_attention_heads=5)
    return [str(folder)], "head counts do not divide: W_Q has 48 output rows, not a multiple of n_heads=5"


def _bad_kv_heads_do_not_divide(tmp_path):
    folder = _saved(tmp_path, "llama")
    _edit_config(folder, num_key_value_heads=4)
    return [str(folder)], "head counts do not divide: n_heads=6 must be a positive multiple of n_kv_heads=4"


def _bad_kv_heads_wrong(tmp_path):
    folder = _saved(tmp_path, "llama")
    _edit_config(folder, num_key_value_heads=3)
    return [str(folder)], "W_K in .* has 24 output rows; expected n_heads·d_head = 36"


def _bad_missing_shard(tmp_path):
    folder = tmp_path / "sharded"
    tiny_hf_model("llama").save_pretrained(folder, max_shard_size="20KB")
    sorted(folder.glob("model-*.safetensors"))[1].unlink()
    return [str(folder)], "lists shards that are missing"


def _bad_pickle_only(tmp_path):
    folder = tmp_path / "pt"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"\0" * 10)
    return [str(folder)], r"pytorch_model.bin: torch's restricted loader .*never runs a full unpickle"


def _bad_config_json(tmp_path):
    folder = _saved(tmp_path)
    (folder / "config.json").write_text("{not json")
    return [str(folder)], "config.json is not valid JSON"


def _bad_rtol(tmp_path):
    return ["minilm", "--rtol", "1.5"], r"--rtol: expected a number in \[0, 1\)"


def _bad_n_heads(tmp_path):
    return ["minilm", "--n-heads", "0"], "--n-heads: expected a positive integer"


def _bad_family(tmp_path):
    return ["minilm", "--family", "mamba"], "invalid choice: 'mamba'"


BAD_INPUTS = [
    _bad_missing,
    _bad_text_file,
    _bad_wrong_suffix,
    _bad_torch_file,
    _bad_garbage_in_folder,
    _bad_truncated,
    _bad_unsupported,
    _bad_heads_do_not_divide,
    _bad_kv_heads_do_not_divide,
    _bad_kv_heads_wrong,
    _bad_missing_shard,
    _bad_pickle_only,
    _bad_config_json,
    _bad_rtol,
    _bad_n_heads,
    _bad_family,
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda f: f.__name__[5:])
def test_bad_input_is_one_line_and_exit_code_2(case, tmp_path, capsys) -> None:
    import re

    args, expected = case(tmp_path)
    capsys.readouterr()  # drop what building the fixture printed
    try:
        rc = main(["inspect", *args])
    except SystemExit as exit_:  # argparse-level mistakes exit from the parser
        rc = exit_.code
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(expected, err), err
    assert "Traceback" not in err


def test_console_script_error_has_no_traceback(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qkvlab", "inspect", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "no such file or folder" in result.stderr


def test_malformed_headers_and_index_are_one_line_errors(tmp_path, capsys) -> None:
    import struct

    def write(name: str, header: dict) -> str:
        raw = json.dumps(header).encode()
        (tmp_path / name).write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
        return str(tmp_path / name)

    cases = [
        write("a.safetensors", {"x": 1}),
        write("b.safetensors", {"x": {"dtype": "F32", "shape": [1]}}),
        write("c.safetensors", {"x": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}),
    ]
    folder = tmp_path / "escape"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../../etc/passwd"}})
    )
    cases.append(str(folder))
    for case in cases:
        capsys.readouterr()
        assert main(["inspect", case]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_output_path_mistakes_fail_before_computing(tmp_path, capsys) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    for args in (
        ["--json", str(tmp_path / "dir")],
        ["--csv", str(tmp_path / "dir")],
        ["--plot", str(tmp_path / "file")],
    ):
        capsys.readouterr()
        assert main(["inspect", "minilm", "--quiet", *args]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_report_object_in_python_and_notebooks() -> None:
    import qkvlab

    report = qkvlab.inspect("minilm")
    text = repr(report)
    assert text.startswith("<InspectReport minilm: bert, 6 layers × 12 heads") and len(text) < 300
    assert "qk erank mean" in text and "singular_values" not in text
    page = report._repr_html_()
    assert page.count("<tr>") == 1 + 6 and "QK erank" in page  # header + one row per layer
    frame = report.to_pandas()
    assert len(frame) == 6 * 12 * 2 and {"layer", "head", "product", "effective_rank"} <= set(frame.columns)
    one = frame[(frame["layer"] == 2) & (frame["head"] == 5) & (frame["product"] == "ov")]
    assert one["effective_rank"].item() == report.select("ov", layer=2, head=5)[0]["effective_rank"]
    assert len(report.select("qk", layer=1)) == 12 and len(report.select("qk", head=0)) == 6
    for bad, message in [
        (lambda: report.select("QK"), "unknown product 'QK'; this report has: qk, ov"),
        (lambda: report.select("qk", layer=6), "layer 6 out of range"),
        (lambda: report.select("ov", head=-1), "head -1 out of range"),
    ]:
        with pytest.raises(ValueError, match=message):
            bad()


def test_nonfinite_heads_are_flagged_not_silently_dropped(tmp_path, capsys) -> None:
    import torch

    from qkvlab.inspection import inspect, summary_metrics

    from conftest import tiny_hf_model

    model = tiny_hf_model("gpt2")
    with torch.no_grad():  # head 1 of layer 0: a NaN in its slice of the fused c_attn (its query)
        model.transformer.h[0].attn.c_attn.weight[0, 8 + 1] = float("nan")
    report = inspect(model)
    row = report.layer_summary()[0]
    assert row["qk_nonfinite_heads"] == 1 and row["ov_nonfinite_heads"] == 0
    assert row["qk_erank_mean"] == row["qk_erank_mean"]  # the finite heads' mean, not NaN
    metrics = summary_metrics(report)
    assert metrics["spectra/L0/qk_nonfinite_heads"] == 1.0 and "spectra/L1/qk_nonfinite_heads" not in metrics
    from qkvlab.render.tables import inspect_text

    assert (
        "WARNING: non-finite weights (left out of the statistics above): layer 0 QK heads 1"
        in inspect_text(report).splitlines()
    )


def test_help_version_and_argument_errors_do_not_import_torch() -> None:
    """Importing torch costs about a second: `--help`, `--version` and argparse's errors of every
    subcommand answer without it (the package's names load on first use)."""
    import subprocess
    import sys

    script = """
import contextlib, io, sys
from qkvlab.cli import main
lines = [["--help"], ["--version"], ["nope"], ["inspect"], ["train", "--nope"], ["theory", "--steps", "x"],
         ["repro", "wd-rank", "--jobs", "0"], ["repro"]]
for command in ("inspect", "train", "sweep", "finetune", "theory", "report", "demo", "repro"):
    lines.append([command, "--help"])
for claim in ("wd-rank", "decouple", "finetune"):
    lines.append(["repro", claim, "--help"])
for argv in lines:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(argv)
        except SystemExit:
            pass
    if "torch" in sys.modules:
        print("torch imported by", argv)
        break
print(len(lines), "torch" in sys.modules)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip().endswith("False"), done.stdout + done.stderr


def test_notes_say_what_the_products_leave_out_and_when_rank_is_noise(tmp_path, capsys) -> None:
    import json
    import warnings

    import torch
    import transformers as tf

    import qkvlab
    from qkvlab.cli import main

    torch.manual_seed(0)
    qwen3 = tf.Qwen3Model(
        tf.Qwen3Config(
            vocab_size=64,
            hidden_size=48,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=8,
            num_hidden_layers=2,
            intermediate_size=64,
        )
    ).to(torch.bfloat16)
    qwen3.save_pretrained(tmp_path / "qwen3")
    with warnings.catch_warnings(record=True) as caught:  # Python: one warning
        warnings.simplefilter("always")
        report = qkvlab.inspect(tmp_path / "qwen3")
    assert len([w for w in caught if "rounding noise" in str(w.message)]) == 1
    assert report.rank_noise_limited
    assert any("q_norm.weight" in n and "k_norm.weight" in n for n in report.notes)
    assert any("rotary" in n for n in report.notes)
    # an rtol above 10·eps of bf16 is not noise-limited
    assert not qkvlab.inspect(tmp_path / "qwen3", rtol=0.1).rank_noise_limited
    # the terminal prints every note once under the table, and the JSON carries them
    assert main(["inspect", str(tmp_path / "qwen3"), "--quiet", "--json", str(tmp_path / "q.json")]) == 0
    data = json.loads((tmp_path / "q.json").read_text())
    assert data["rank_noise_limited"] is True and data["notes"] == report.notes
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "qwen3")]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("note: ") == len(report.notes) and "UserWarning" not in captured.err
    # float32 weights: nothing to say about precision
    assert not qkvlab.inspect(qwen3.float()).rank_noise_limited
    # --spectrum-method forces the route; the JSON says which ran
    assert data["precision"]["method"] == "gram"
    exact = tmp_path / "qr.json"
    assert (
        main(["inspect", str(tmp_path / "qwen3"), "--quiet", "--spectrum-method", "qr", "--json", str(exact)])
        == 0
    )
    assert json.loads(exact.read_text())["precision"]["method"] == "qr"
    with pytest.raises(SystemExit) as bad:
        main(["inspect", str(tmp_path / "qwen3"), "--spectrum-method", "float16"])
    assert bad.value.code == 2 and "invalid choice: 'float16'" in capsys.readouterr().err


def test_head_counts_that_contradict_the_config_are_refused(tmp_path, capsys) -> None:
    from qkvlab.cli import main

    from conftest import tiny_hf_model

    tiny_hf_model("llama").save_pretrained(tmp_path)  # 6 heads, 2 KV heads
    assert main(["inspect", str(tmp_path), "--n-heads", "4"]) == 2
    assert "--n-heads 4 contradicts the config, which says 6" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path), "--n-kv-heads", "3"]) == 2
    assert "--n-kv-heads 3 contradicts the config, which says 2" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path), "--n-heads", "6", "--quiet"]) == 0  # agreeing is fine


def _checkpoints(folder, names, kind="gpt2"):
    """HF checkpoints of one tiny model at a few states of "training" (more noise each time)."""
    import torch

    from conftest import tiny_hf_model

    model = tiny_hf_model(kind)
    for i, name in enumerate(names):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * i * torch.randn_like(p))
        model.save_pretrained(folder / name)
    return folder


def test_many_checkpoints_in_one_call_in_step_order(tmp_path, capsys) -> None:
    import json

    import qkvlab
    from qkvlab.cli import main
    from qkvlab.inspection import InspectSeries, checkpoint_step, expand_sources

    run = _checkpoints(tmp_path / "run", ["checkpoint-200", "checkpoint-50", "checkpoint-1000"])
    (tmp_path / "run" / ".tmp-checkpoint-9").mkdir()  # a crash's debris is not a checkpoint
    assert [checkpoint_step(p) for p in expand_sources([run])] == [50, 200, 1000]
    assert checkpoint_step("pythia-70m/step143000") == 143000 and checkpoint_step("final") is None
    code = main(["inspect", str(run), "--json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "p")])
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("3 checkpoints: gpt2, 3 layers, 6 heads")
    series = InspectSeries.from_dict(json.loads((tmp_path / "s.json").read_text()))
    assert series.steps == [50, 200, 1000]
    # each record is exactly what inspecting that checkpoint alone gives
    for report, name in zip(
        series.reports, ["checkpoint-50", "checkpoint-200", "checkpoint-1000"], strict=True
    ):
        assert report.heads == qkvlab.inspect(run / name).heads
    assert (tmp_path / "p" / "rank_and_gap_over_checkpoints.png").is_file()
    # sources given one by one keep their order; without steps the x axis is the position
    two = main(
        [
            "inspect",
            str(run / "checkpoint-1000"),
            str(run / "checkpoint-50"),
            "--quiet",
            "--json",
            str(tmp_path / "t.json"),
        ]
    )
    assert two == 0
    given = json.loads((tmp_path / "t.json").read_text())
    assert given["kind"] == "inspect-series" and given["steps"] == [1000, 50]
    # the report plots rank and gap against the step
    assert main(["report", str(tmp_path / "s.json"), "--out", str(tmp_path / "page")]) == 0
    assert "Over 3 checkpoints" in (tmp_path / "page" / "report.md").read_text()


def test_a_series_refuses_checkpoints_of_different_models(tmp_path, capsys) -> None:
    from qkvlab.cli import main

    _checkpoints(tmp_path / "a", ["step1"])
    _checkpoints(tmp_path / "b", ["step2"], kind="llama")
    capsys.readouterr()  # drop what saving printed
    code = main(["inspect", str(tmp_path / "a" / "step1"), str(tmp_path / "b" / "step2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "a series compares checkpoints of one model" in err[0]
    assert main(["inspect", str(tmp_path / "a" / "step1"), str(tmp_path / "b"), "--compare", "x"]) == 2


def test_a_hub_name_is_found_in_the_local_cache_or_refused_saying_so(
    tiny_bert, tmp_path, monkeypatch, capsys
) -> None:
    """Issue 30: `inspect org/model` reads the local Hugging Face cache (never the network); a name that is
    not cached says that hub names are not fetched; a pickled checkpoint says why it is not read."""
    import shutil

    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-bert" / "snapshots" / "abc123"
    shutil.copytree(tiny_bert, snapshot)
    (cache / "models--someone--tiny-bert" / "refs").mkdir()
    (cache / "models--someone--tiny-bert" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    assert main(["inspect", "someone/tiny-bert", "--json", str(tmp_path / "r.json"), "--quiet"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["source"] == "someone/tiny-bert"
    assert main(["inspect", "someone/not-cached"]) == 2
    err = capsys.readouterr().err
    assert (
        "nor a Hub model in the local Hugging Face cache" in err and "hf download someone/not-cached" in err
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # --download while offline: one line, the hub library's reason
    assert main(["inspect", "someone/not-cached", "--download"]) == 2
    assert "--download someone/not-cached: the Hub could not be read" in capsys.readouterr().err
    assert main(["inspect", "someone/tiny-bert", "--download", "--quiet"]) == 0  # cached: nothing fetched
    (tmp_path / "ckpt.pt").write_bytes(b"\x80\x04not really")
    assert main(["inspect", str(tmp_path / "ckpt.pt")]) == 2
    assert "never runs a full unpickle" in capsys.readouterr().err


def test_step_is_recorded_in_the_json_of_one_checkpoint(tiny_bert, tmp_path, capsys) -> None:
    out = tmp_path / "at5.json"
    assert main(["inspect", str(tiny_bert), "--json", str(out), "--step", "5", "--quiet"]) == 0
    assert json.loads(out.read_text())["step"] == 5
    assert main(["inspect", str(tiny_bert), "--step", "5"]) == 2  # nowhere to record it
    assert "accepted: one SOURCE with --json" in capsys.readouterr().err


def test_the_layer_bar_shows_on_a_terminal_only(capsys, monkeypatch) -> None:
    """A slow checkpoint draws its layer bar on a terminal, never into a log, a pipe or CI, where its
    residue would break a user mistake's one line (it did, on a loaded machine)."""
    import io
    import time

    from qkvlab.cli import _tqdm_progress

    def slow(n):  # type: ignore[no-untyped-def]
        for i in range(n):
            time.sleep(0.4)  # past the bar's 0.5 s delay
            yield i

    list(_tqdm_progress(slow(2), 2))
    assert "layers" not in capsys.readouterr().err

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    list(_tqdm_progress(slow(2), 2))
    assert "layers" in terminal.getvalue()
