"""Checkpoints on disk, read lazily, give the same numbers as the live module."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import qkvlab
from qkvlab.attention import DiskSource

from conftest import HF_KINDS, tiny_hf_model


def _same_report(a: qkvlab.InspectReport, b: qkvlab.InspectReport) -> None:
    assert a.architecture == b.architecture
    assert len(a.heads) == len(b.heads)
    for x, y in zip(a.heads, b.heads, strict=True):
        assert x == y  # bit-identical: same float32 tensors, same float64 maths


@pytest.mark.parametrize("kind", HF_KINDS)
def test_model_folder_streams_to_the_same_numbers(kind: str, tmp_path) -> None:
    model = tiny_hf_model(kind)
    model.save_pretrained(tmp_path)
    _same_report(qkvlab.inspect(tmp_path), qkvlab.inspect(model))


def test_sharded_checkpoint_with_index(tmp_path) -> None:
    model = tiny_hf_model("llama")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 3
    _same_report(qkvlab.inspect(tmp_path), qkvlab.inspect(model))


def test_bare_safetensors_file_with_head_count(tmp_path) -> None:
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), num_layers=3, enable_nested_tensor=False
    )
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, tmp_path / "enc.safetensors")
    with pytest.raises(qkvlab.UserError, match="--n-heads"):
        qkvlab.inspect(tmp_path / "enc.safetensors")
    _same_report(qkvlab.inspect(tmp_path / "enc.safetensors", n_heads=4), qkvlab.inspect(encoder))


def test_bare_safetensors_file_picks_up_config_beside_it(tmp_path) -> None:
    model = tiny_hf_model("bert")
    model.save_pretrained(tmp_path)
    _same_report(qkvlab.inspect(tmp_path / "model.safetensors"), qkvlab.inspect(model))


def test_packaged_minilm_streams_like_the_loaded_model(minilm_path) -> None:
    from transformers import AutoModel

    _same_report(qkvlab.inspect("minilm"), qkvlab.inspect(AutoModel.from_pretrained(minilm_path)))


def test_disk_source_reads_only_requested_tensors(tmp_path) -> None:
    model = tiny_hf_model("gpt2")
    model.save_pretrained(tmp_path)
    source = DiskSource(tmp_path)
    asked = []
    real_get = source.get
    source.get = lambda key: asked.append(key) or real_get(key)
    qkvlab.attention.AttentionFactors(source).layer(1)
    assert sorted(asked) == ["transformer.h.1.attn.c_attn.weight", "transformer.h.1.attn.c_proj.weight"]


def test_bf16_checkpoint(tmp_path) -> None:
    model = tiny_hf_model("qwen2").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    # bfloat16 weights at the default rtol 1e-3 < 10·eps: inspect warns that rank counts rounding noise.
    with pytest.warns(UserWarning, match="counts rounding noise"):
        from_disk = qkvlab.inspect(tmp_path)
    with pytest.warns(UserWarning, match="counts rounding noise"):
        in_memory = qkvlab.inspect(model)
    _same_report(from_disk, in_memory)
    # bf16 storage: the Gram route by default, with its bound stated in the JSON and under the table
    assert from_disk.precision["method"] == "gram"
    bound = from_disk.precision["relative_error_bound"]
    assert 0 < bound < 1e-4 and any("float64 Gram matrices" in note for note in from_disk.notes)
    with pytest.warns(UserWarning, match="counts rounding noise"):
        exact = qkvlab.inspect(tmp_path, method="qr")
    assert exact.precision["method"] == "qr" and not any("Gram" in n for n in exact.notes)
    for fast, slow in zip(from_disk.heads + from_disk.groups, exact.heads + exact.groups, strict=True):
        top = slow["singular_values"][0]
        assert (
            max(abs(x - y) for x, y in zip(fast["singular_values"], slow["singular_values"], strict=True))
            <= bound * top
        )
    assert qkvlab.InspectReport.from_dict(from_disk.to_dict()).precision == from_disk.precision
