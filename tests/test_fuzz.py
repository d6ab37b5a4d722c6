"""Promise 7 of RELIABILITY.md: a user mistake is a UserError (one line, exit 2), never another
exception and never a silent wrong value. Property-based with hypothesis over what users type:
``key=value`` overrides, config files, and labelled data files."""

from __future__ import annotations

import itertools
import math
import os
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

    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)))

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
        (["train", str(binary)], "is not UTF-8 text (byte 128)"),
        (["train", "lr="], "lr=''; accepted: a number"),
        # keys the grid sets per run would be silently replaced
        (["sweep", "--grid", "lr=1e-3,2e-3", "seed=3"], "seed=3 would be ignored: seeds go in --seeds"),
        (["sweep", "--grid", "lr=1e-3,2e-3", "out=elsewhere"], "out=elsewhere would be ignored"),
        (
            ["repro", "wd-rank", "--set", "seed=3", "--out", str(tmp_path / "r")],
            "--set seed=3 would be ignored",
        ),
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


# -- every other command line, with the work itself replaced -----------------------------------
#
# train, sweep, repro, finetune and theory would train or run for seconds to hours once their input
# is accepted. Here the first step of the real work raises _Reached instead: everything before it
# (argument parsing, config and data loading, resume checks, output paths) runs for real, and what
# reaches the work must be sane. The rest of the work is covered by the other tests.


class _Reached(Exception):
    """The command accepted its input and began the real work."""


@pytest.fixture(scope="module")
def fuzz_place(tmp_path_factory, tiny_bert, tiny_csv) -> Path:
    """A folder of things a command line can point at: good and bad config files, data files,
    model folders, a finished run, a file where a folder belongs."""
    import shutil

    from qkvlab.cli import main

    from conftest import tiny_gpt_settings

    place = tmp_path_factory.mktemp("fuzz-cli")
    (place / "corpus.txt").write_text("to be or not to be, that is the question. " * 200)
    (place / "afile").write_text("not a folder\n")
    (place / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (place / "latin1.yaml").write_bytes("lr: 1e-3 # caf\xe9\n".encode("latin-1"))
    (place / "list.yaml").write_text("- 1\n- 2\n")
    (place / "empty.yaml").write_text("")
    (place / "good.yaml").write_text(
        f"data: text:{place / 'corpus.txt'}\nseq_len: 16\nmax_steps: 5\nwarmup_steps: 1\n"
    )
    (place / "binary.csv").write_bytes(bytes(range(256)) * 4)
    (place / "arrays.jsonl").write_text("[1, 2]\n[3, 4]\n")
    shutil.copy(tiny_csv, place / "reviews.csv")
    shutil.copytree(tiny_bert, place / "bert")
    shutil.copytree(tiny_bert, place / "notok", ignore=shutil.ignore_patterns("*.txt", "tok*", "special*"))
    settings = tiny_gpt_settings(place / "corpus.txt", place / "run", max_steps=4, spectra_every=2)
    assert main(["train", *(f"{k}={v}" for k, v in settings.items())]) == 0
    # repro rank-guard's default --reference
    (place / "results" / "paper000-gpt" / "runs").mkdir(parents=True)
    # what someone else's folder or a damaged disk may hold (issue 28's probe)
    (place / "outside.txt").write_text("keep me\n")
    for name, plant in (("linkedrun", ".lock"), ("linkedmetrics", "metrics.jsonl")):
        shutil.copytree(place / "run", place / name)
        (place / name / plant).unlink(missing_ok=True)
        (place / name / plant).symlink_to(place / "outside.txt")
    shutil.copytree(place / "run", place / "garbledrun")
    (place / "garbledrun" / "config.json").write_bytes(b"\xff\xfe[1, 2")
    shutil.copytree(place / "run", place / "listrun")
    (place / "listrun" / "config.json").write_text("[1, 2]")
    (place / "three.csv").write_text("text,label\na,pos\nb,neg\nc,pos\n")
    (place / "thirty.csv").write_text("text,label\n" + "".join(f"x{i},c{i}\n" for i in range(30)))
    (place / "objects.jsonl").write_text(
        "".join(f'{{"text": "t{i}", "label": {{"a": {i % 2}}}}}\n' for i in range(40))
    )
    shutil.copytree(tiny_bert, place / "pickled")
    import pickle

    (place / "pickled" / "model.safetensors").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    return place


PATHS = [
    "{tmp}",
    "{tmp}/afile",
    "{tmp}/afile/below",
    "{tmp}/missing/deeper/out",
    "{tmp}/run",
    "{tmp}/run/config.json",
    "{tmp}/binary.yaml",
    "{tmp}/latin1.yaml",
    "{tmp}/list.yaml",
    "{tmp}/empty.yaml",
    "{tmp}/good.yaml",
    "{tmp}/missing.yaml",
    "shakespeare-gpt",
    "{tmp}/linkedrun",
    "{tmp}/linkedmetrics",
    "{tmp}/garbledrun",
    "{tmp}/listrun",
    "/proc/nope/out",
    "{tmp}/" + "n" * 300,
    "{tmp}/run ",
]
NUMBERS = [
    *["0", "1", "-1", "2", "0.5", "1e-3", "nan", "inf", "-inf", "1e400", "", "x", "0,1", "0,,1", "1,nan"],
    *["99999999999999999999", "99999999999999999999999", "2147483648", "0,99999999999999999999", "1e30"],
]
OVERRIDES = [
    "max_steps=3",
    "max_steps=0",
    "max_steps=-2",
    "batch_size=0",
    "lr=nan",
    "lr=inf",
    "lr=-1",
    "seed=-1",
    "seed=1",
    "optimizer=sgd",
    "optimizer=nope",
    "data=nope",
    "data=text:{tmp}/missing.txt",
    "data=text:{tmp}/binary.csv",
    "data=recall",
    "online=true",
    "model.n_layer=0",
    "model.n_head=3",
    "out={tmp}/afile",
    "out={tmp}/afile/below",
    "out={tmp}/missing/deeper/out",
    "out={tmp}/run",
    "out=runs/{x}",
    "stop_at=1",
    "nokey=1",
    "=1",
    "lr=",
    "spectra_every=-1",
    "seed=99999999999999999999",
    "seed=2147483648",
    "model.n_head=5000000",
    "out=/proc/nope/x",
    "out={tmp}/" + "o" * 300,
    "out={tmp}/run ",
]


PRESETS = [
    "decoupled-attn",
    "qv-ratio:ratio=4",
    "qv-ratio:ratio=-1",
    "qv-ratio:ratio=nan",
    "nope",
    "loraplus:x=1",
    ":",
]
OUTS = [p for p in PATHS if "yaml" not in p]
GRIDS = [
    "lr=1e-3,2e-3",
    "model.n_layer=1,2",
    "seed=1,2",
    "nokey=1,2",
    "lr=,,",
    "lr=1e-3,nan",
    "weight_decay=a,b",
    "optimizer=adamw,sgd",
    "out=a,b",
    "max_steps=0,1",
    "lr",
    "lr=1e-3,0.001",
    "lr=1e-3,1e-3",
    "seed=99999999999999999999",
]
SETS = [
    "model.bias=true",
    "max_steps=2",
    "lr=nan",
    "nokey=1",
    "online=true",
    "max_steps=100000",
    "device=cuda",
]
DATA = [
    "csv:{tmp}/reviews.csv",
    "csv:{tmp}/binary.csv",
    "jsonl:{tmp}/arrays.jsonl",
    "csv:{tmp}/missing.csv",
    "csv:{tmp}",
    "jsonl:",
    "nope",
    "csv:{tmp}/three.csv",
    "csv:{tmp}/thirty.csv",
    "jsonl:{tmp}/objects.jsonl",
]
MODELS = ["{tmp}/bert", "{tmp}/notok", "{tmp}/run", "{tmp}/afile", "{tmp}/missing", "{tmp}", "{tmp}/pickled"]
# option → the values people give it: each command line is a shuffled set of options with values
# from these pools (or a number or word that belongs elsewhere), plus positionals
OPTIONS = {
    "train": {"--preset": PRESETS, "--resume": PATHS},
    "sweep": {"--grid": GRIDS, "--seeds": NUMBERS, "--jobs": NUMBERS, "--out": OUTS},
    "repro wd-rank": {
        "--setting": ["gpt", "gpt-online", "vit", "recall", "icl-linear", "icl-softmax", "nope"],
        "--lambdas": NUMBERS,
        "--rest": NUMBERS,
        "--seeds": NUMBERS,
        "--jobs": NUMBERS,
        "--set": SETS,
        "--plot": OUTS,
        "--out": OUTS,
        "--summary-only": None,
    },
    "repro decouple": {
        "--attn-lambdas": NUMBERS,
        "--rest-lambdas": NUMBERS,
        "--seeds": NUMBERS,
        "--set": SETS,
        "--out": OUTS,
        "--plot": OUTS,
        "--summary-only": None,
    },
    "repro optimizer-rank": {
        "--setting": ["gpt", "recall", "nope"],
        "--budgets": NUMBERS,
        "--variants": ["adamw,muon", "muon-head", "adam-l2,", "sgd", "", ","],
        "--seeds": NUMBERS,
        "--jobs": NUMBERS,
        "--set": SETS,
        "--plot": OUTS,
        "--out": OUTS,
        "--summary-only": None,
    },
    "repro rank-guard": {
        "--targets": ["mild", "mild,strong", "nope", "", ","],
        "--reference": OUTS,
        "--seeds": NUMBERS,
        "--jobs": NUMBERS,
        "--set": SETS,
        "--plot": OUTS,
        "--out": OUTS,
        "--summary-only": None,
    },
    "repro finetune": {"--seeds": NUMBERS, "--out": OUTS, "--summary-only": None, "--pilot": None},
    "finetune": {
        "--model": MODELS,
        "--data": DATA,
        "--targets": ["q,v", "q,q", "k", "all", "q,x", "", ","],
        "--method": ["lora", "full", "x"],
        "--rank": NUMBERS,
        "--alpha": NUMBERS,
        "--lr": NUMBERS,
        "--lr-ratio": NUMBERS,
        "--weight-decay": NUMBERS,
        "--epochs": NUMBERS,
        "--batch-size": NUMBERS,
        "--max-length": NUMBERS,
        "--max-train-examples": NUMBERS,
        "--seed": NUMBERS,
        "--preset": PRESETS,
        "--device": ["cpu", "cuda", "tpu"],
        "--out": OUTS,
        "--no-save": None,
    },
    "theory": {
        "--lambdas": NUMBERS,
        "--steps": NUMBERS,
        "--lr": NUMBERS,
        "--seeds": NUMBERS,
        "--optimizers": ["adamw", "none", "sgd", "adamw,adamw", "", "sgd-momentum,adam-l2"],
        "--parts": ["toy", "toy,completion", "pretrained", "nope", "", "optimizers"],
        "--completion-lambdas": NUMBERS,
        "--model": MODELS,
        "--json": OUTS,
        "--plot": OUTS,
    },
}
CONFIGS = [p for p in PATHS if p.endswith(".yaml") or p == "shakespeare-gpt"]
# finetune always gets a model and data unless the generated line names its own (argparse keeps
# the last), so most lines reach the model and data checks rather than stopping at a missing option
BASE = {
    "sweep": ["--grid", "lr=1e-3,2e-3"],
    "finetune": ["--model", "{tmp}/bert", "--data", "csv:{tmp}/reviews.csv", "--max-steps", "2"],
}
JUNK = st.text(string.ascii_letters + string.digits + "-_.,=:", max_size=8)


@st.composite
def command_lines(draw: st.DrawFn) -> list[str]:
    command = draw(st.sampled_from(sorted(OPTIONS)))
    options = OPTIONS[command]
    argv = [*command.split(), *BASE.get(command, [])]
    if command in ("train", "sweep"):  # a config file (or none), then overrides
        argv += draw(st.lists(st.sampled_from(CONFIGS), max_size=1))
        argv += draw(st.lists(st.sampled_from(OVERRIDES), max_size=3))
    for option in draw(st.lists(st.sampled_from(sorted(options)), max_size=4)):
        pool = options[option]
        argv.append(option)
        if pool is not None:
            argv.append(draw(st.sampled_from(pool if draw(st.integers(0, 4)) else NUMBERS + PATHS)))
    if draw(st.integers(0, 9)) == 0:  # now and then a stray word anywhere
        argv.insert(draw(st.integers(1, len(argv))), draw(JUNK))
    return argv


@pytest.fixture
def stubbed_work(monkeypatch):
    """Replace the first step of each command's real work by a check of what reached it."""
    import qkvlab.finetune.run as finetune_run
    import qkvlab.grid.runner as grid
    import qkvlab.grid.sweep as sweep
    import qkvlab.repro.theory.claim as theory
    import qkvlab.train.loop as trainer

    def build_model(model_config):  # train: config, resume checks and data all passed
        raise _Reached

    def run_grid(out, runs, worker, **kwargs):  # sweep and repro: every cell's config loaded
        assert runs and all(run.seed >= 0 for run in runs)
        raise _Reached

    def encode(*args, **kwargs):  # finetune: model, tokenizer, data and targets all passed
        raise _Reached

    def run_theory(settings, progress=None, opened=None):
        assert settings.steps > 0 and math.isfinite(settings.lr) and settings.lr > 0
        raise _Reached

    original_train = trainer._train

    def checked_train(config, resume, run_dir, command):
        _check_config(config)
        return original_train(config, resume, run_dir, command)

    monkeypatch.setattr(trainer, "build_model", build_model)
    monkeypatch.setattr(trainer, "_train", checked_train)
    monkeypatch.setattr(grid, "run_grid", run_grid)
    monkeypatch.setattr(sweep, "run_grid", run_grid)
    monkeypatch.setattr(finetune_run, "_encode", encode)
    monkeypatch.setattr(theory, "run_theory", run_theory)


# `make test` runs 400; a hand run sets QKVLAB_FUZZ_LINES=5000 (RELIABILITY.md says what it found)
@settings(
    max_examples=int(os.environ.get("QKVLAB_FUZZ_LINES", "400")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(line=command_lines())
def test_any_command_line_of_every_command_is_handled(fuzz_place, stubbed_work, line) -> None:
    import contextlib
    import io

    from qkvlab.cli import main

    argv = [t.replace("{tmp}", str(fuzz_place)) for t in line]
    out = io.StringIO()
    reached = False
    with contextlib.chdir(fuzz_place), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own usage errors and --help
            code = exc.code
        except _Reached:
            reached, code = True, 0
    assert code in (0, 2), (argv, out.getvalue()[-800:])
    if code == 2:
        lines = [x for x in out.getvalue().strip().splitlines() if x.startswith("qkvlab")]
        assert len(lines) == 1 and "Traceback" not in out.getvalue(), (argv, out.getvalue()[-800:])
    if reached:  # nothing unusable got through: outputs into a file's place are refused first
        given = {}  # the last of each output option wins, as in argparse and the overrides
        for option, value in itertools.pairwise(argv):
            if option in ("--out", "--plot", "--json"):
                given[option] = value
        for token in argv:
            if token.startswith("out="):
                given["out="] = token.removeprefix("out=")
        json_file = given.pop("--json", "")
        assert not any("/afile" in f for f in given.values()) and "/afile/" not in json_file, argv
        for path in [*given.values(), json_file]:  # unwritable, over-long or space-padded: refused first
            assert "/proc/nope" not in path and path == path.strip(), argv
            assert all(len(part.encode()) <= 255 for part in Path(path).parts), argv
        assert (fuzz_place / "outside.txt").read_text() == "keep me\n", argv
    elif code == 0:  # exit 0 without reaching the work: only help, --help-keys and --summary-only
        assert {"-h", "--help", "--help-keys", "--summary-only"} & set(argv) or "help" in out.getvalue(), argv
