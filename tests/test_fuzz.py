"""Promise 7 of RELIABILITY.md: a user mistake is a UserError (one line, exit 2), never another
exception and never a silent wrong value. Property-based with hypothesis over what users type:
``key=value`` overrides, config files, and labelled data files."""

from __future__ import annotations

import math
import string
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkvlab.config import TrainConfig, config_keys, load_config
from qkvlab.errors import UserError

KEYS = config_keys()
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# What people type as a value: numbers of every kind, words, empty, lists, paths, JSON fragments.
VALUES = st.one_of(
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        [
            "",
            " ",
            "nan",
            "inf",
            "-inf",
            "1e400",
            "true",
            "False",
            "none",
            "null",
            "[1,2]",
            "{}",
            "0x10",
            "1_000",
            "½",
            "runs/{x}",
            "runs/{name}/{seed}",
            "../..",
            "adamw",
            "cosine",
        ]
    ),
    st.text(string.printable, max_size=12),
)


def _check_config(config: TrainConfig) -> None:
    """A config that loaded must hold only sane values: finite numbers, positive sizes."""
    flat = {**{k: v for k, v in vars(config).items() if k != "model"}, **vars(config.model)}
    for key, value in flat.items():
        if isinstance(value, float):
            assert math.isfinite(value), f"{key}={value} accepted"
    assert config.max_steps > 0 and config.batch_size > 0 and config.lr > 0


@FUZZ
@given(
    key=st.one_of(st.sampled_from(KEYS), st.text(string.ascii_letters + "._", min_size=1, max_size=16)),
    value=VALUES,
)
def test_any_override_loads_or_is_a_user_error(key: str, value: str) -> None:
    try:
        config = load_config(None, {key: value})
    except UserError as exc:
        assert "\n" not in str(exc).strip(), "a user error is one line"
        return
    _check_config(config)


@FUZZ
@given(pairs=st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=4))
def test_any_set_of_overrides_loads_or_is_a_user_error(pairs: dict[str, str]) -> None:
    try:
        config = load_config(None, pairs)
    except UserError:
        return
    _check_config(config)


YAML_TEXT = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.dictionaries(st.sampled_from([*KEYS, "model", "bogus"]), VALUES, max_size=5).map(
        lambda d: "\n".join(f"{k}: {v}" for k, v in d.items())
    ),
    st.sampled_from(
        ["- a\n- b", "model: 3", "model:\n  n_layer: -1", "lr: [1, 2]", "!!binary AAAA", "a: b: c"]
    ),
)


@FUZZ
@given(text=YAML_TEXT)
def test_any_config_file_loads_or_is_a_user_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_bytes(text.encode("utf-8", errors="surrogateescape"))
        try:
            config = load_config(path)
        except UserError:
            return
        _check_config(config)


ROWS = st.lists(
    st.tuples(
        st.text(max_size=20),
        st.one_of(st.sampled_from(["pos", "neg", "", "1", "0", "nan"]), st.text(max_size=4)),
    ),
    max_size=30,
)


@FUZZ
@given(
    header=st.sampled_from(["text,label", "label,text", "sentence,label", "text", "text,label,label", ""]),
    rows=ROWS,
    kind=st.sampled_from(["csv", "jsonl", "binary"]),
)
def test_any_labelled_data_file_loads_or_is_a_user_error(header: str, rows: list, kind: str) -> None:
    import csv
    import io
    import json

    from qkvlab.finetune.data import load_labelled

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data.{'jsonl' if kind == 'jsonl' else 'csv'}"
        if kind == "csv":
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            if header:
                writer.writerow(header.split(","))
            writer.writerows(rows)
            path.write_text(buffer.getvalue())
        elif kind == "jsonl":
            lines = [json.dumps({"text": t, "label": y}) for t, y in rows] + [
                "[1, 2]" if header == "" else ""
            ]
            path.write_text("\n".join(lines))
        else:
            path.write_bytes(bytes(range(256)) * 3)
        spec = f"{'jsonl' if kind == 'jsonl' else 'csv'}:{path}"
        try:
            data = load_labelled(spec)
        except UserError:
            return
        assert data.num_labels >= 1 or data.regression


def test_the_cases_the_issue_names_are_one_line_refusals(tmp_path, capsys) -> None:
    from qkvlab.cli import main

    cases = [
        (["sweep", "--grid", "lr=,,,"], "has an empty value"),
        (["sweep", "--grid", "lr=1e-3,,3e-3"], "has an empty value"),
        (["repro", "wd-rank", "--seeds", "0,,1", "--out", str(tmp_path / "r")], "has an empty item"),
        (["theory", "--lambdas", "0,inf"], "accepted: comma-separated finite numbers"),
        (["theory", "--lambdas", "0,,1"], "has an empty item"),
        (
            ["train", "out=runs/{x}", "max_steps=5", "warmup_steps=1"],
            "out='runs/{x}' is not a folder template",
        ),
        (["train", "out=runs/{", "max_steps=5", "warmup_steps=1"], "is not a folder template"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], (argv, err)
    assert not (tmp_path / "r" / "runs").exists()  # the repro grid did not start


# -- the command line itself -------------------------------------------------------------------

TOKENS = st.one_of(
    st.sampled_from(
        [
            "--rtol",
            "--json",
            "--csv",
            "--plot",
            "--family",
            "--n-heads",
            "--n-kv-heads",
            "--quiet",
            "--compare",
            "--out",
            "-1",
            "0",
            "nan",
            "inf",
            "1e-3",
            "bert",
            "gpt2",
            "llama",
            "x",
            "",
            "{tmp}/missing/file.json",
            "{tmp}",
            "{tmp}/model",
            "{tmp}/model/model.safetensors",
        ]
    ),
    st.text(string.ascii_letters + string.digits + "-_./=", max_size=10),
)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    from conftest import tiny_hf_model

    folder = tmp_path_factory.mktemp("fuzz") / "model"
    tiny_hf_model("bert").save_pretrained(folder)
    return folder.parent


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(command=st.sampled_from(["inspect", "report"]), tokens=st.lists(TOKENS, max_size=6))
def test_any_inspect_or_report_command_line_is_handled(small_model, command, tokens, capsys) -> None:
    import contextlib
    import io

    from qkvlab.cli import main

    argv = [command, *(t.replace("{tmp}", str(small_model)) for t in tokens)]
    out = io.StringIO()
    with contextlib.chdir(small_model), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own usage errors
            code = exc.code
    assert code in (0, 2), (argv, out.getvalue()[-500:])
    if code == 2:
        lines = [x for x in out.getvalue().strip().splitlines() if x.startswith("qkvlab") or "error" in x]
        assert lines, (argv, out.getvalue()[-500:])
