"""Small models built offline from configs, shared by the tests. Nothing is downloaded."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["QKVLAB_CHECK_FIGURES"] = "1"  # every figure a test makes must be readable (report.figures)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*bos_token_id.*")


def tiny_bert_classifier(seed: int = 0, num_labels: int = 2) -> torch.nn.Module:
    """A 2-layer BERT classifier (d 32, 4 heads, vocabulary 64) without dropout, so a step has no
    randomness and a resumed loop repeats an uninterrupted one."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=48,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return tf.BertForSequenceClassification(config)


def tiny_hf_model(kind: str) -> torch.nn.Module:
    """A randomly initialised HF model of one family, with a few layers and heads."""
    import transformers as tf

    torch.manual_seed(
        {
            "bert": 0,
            "roberta": 1,
            "gpt2": 2,
            "llama": 3,
            "mistral": 4,
            "qwen2": 5,
            "vit": 6,
            "gpt-neox": 7,
            "opt": 8,
            "phi3": 9,
            "distilbert": 10,
            "t5": 11,
            "mpnet": 12,
        }[kind]
    )
    common = {"hidden_size": 48, "num_attention_heads": 6, "num_hidden_layers": 3, "intermediate_size": 64}
    if kind == "bert":
        model = tf.BertModel(tf.BertConfig(vocab_size=64, **common))
    elif kind == "roberta":
        model = tf.RobertaModel(tf.RobertaConfig(vocab_size=64, **common))
    elif kind == "gpt2":
        model = tf.GPT2LMHeadModel(
            tf.GPT2Config(n_embd=48, n_head=6, n_layer=3, vocab_size=64, bos_token_id=0, eos_token_id=0)
        )
    elif kind == "llama":  # grouped-query attention, head_dim independent of d_model / n_heads
        model = tf.LlamaForCausalLM(
            tf.LlamaConfig(vocab_size=64, num_key_value_heads=2, head_dim=12, **common)
        )
    elif kind == "mistral":
        model = tf.MistralModel(tf.MistralConfig(vocab_size=64, num_key_value_heads=3, **common))
    elif kind == "qwen2":
        model = tf.Qwen2Model(tf.Qwen2Config(vocab_size=64, num_key_value_heads=2, **common))
    elif kind == "vit":
        model = tf.ViTModel(tf.ViTConfig(image_size=16, patch_size=4, **common))
    elif kind == "gpt-neox":  # fused query_key_value interleaved per head, rotary on a quarter of each head
        model = tf.GPTNeoXForCausalLM(
            tf.GPTNeoXConfig(vocab_size=64, rotary_pct=0.25, pad_token_id=0, **common)
        )
    elif kind == "opt":
        model = tf.OPTForCausalLM(
            tf.OPTConfig(
                vocab_size=64,
                hidden_size=48,
                num_attention_heads=6,
                num_hidden_layers=3,
                ffn_dim=64,
                word_embed_proj_dim=48,
                pad_token_id=0,
            )
        )
    elif kind == "phi3":  # fused qkv_proj in [q; k; v] blocks with grouped-query attention
        model = tf.Phi3ForCausalLM(
            tf.Phi3Config(vocab_size=64, num_key_value_heads=2, pad_token_id=0, eos_token_id=1, **common)
        )
    elif kind == "distilbert":
        model = tf.DistilBertModel(
            tf.DistilBertConfig(vocab_size=64, dim=48, n_heads=6, n_layers=3, hidden_dim=64)
        )
    elif kind == "mpnet":  # attention.attn.{q,k,v,o} with a relative-position bias on the scores
        model = tf.MPNetModel(tf.MPNetConfig(vocab_size=64, **common))
    elif kind == "t5":  # encoder self-, decoder self- and cross-attention
        model = tf.T5Model(
            tf.T5Config(
                vocab_size=64,
                d_model=48,
                d_kv=8,
                num_heads=6,
                num_layers=3,
                d_ff=64,
                pad_token_id=0,
                decoder_start_token_id=0,
            )
        )
    else:
        raise ValueError(kind)
    return model.eval()


HF_KINDS = (
    "bert",
    "roberta",
    "gpt2",
    "llama",
    "mistral",
    "qwen2",
    "vit",
    "gpt-neox",
    "opt",
    "phi3",
    "distilbert",
    "mpnet",
)


@pytest.fixture(scope="session")
def minilm_path():
    from qkvlab.attention.sources import resolve_packaged

    return resolve_packaged("minilm")


WORDS = [
    "good",
    "great",
    "fine",
    "bad",
    "awful",
    "poor",
    "movie",
    "plot",
    "actor",
    "scene",
    "the",
    "a",
    "was",
    "is",
    "very",
    "not",
]


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A randomly initialised 2-layer BERT with a tiny word-level tokenizer, saved as a HF folder."""
    import transformers as tf

    folder = tmp_path_factory.mktemp("tiny-bert")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]))
    tf.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=5 + len(WORDS),
        hidden_size=32,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=48,
    )
    tf.BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory):
    """200 labelled "reviews" over WORDS (pos/neg), as a CSV."""
    import csv

    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    gen = torch.Generator().manual_seed(0)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for i in range(200):
            positive = i % 2 == 0
            word = ["good", "great", "fine"][i % 3] if positive else ["bad", "awful", "poor"][i % 3]
            filler = " ".join(WORDS[6 + int(j)] for j in torch.randint(0, 5, (4,), generator=gen))
            writer.writerow([f"the movie was very {word} {filler}", "pos" if positive else "neg"])
    return path


SONNET = (
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate. "
    "Rough winds do shake the darling buds of May, and summer's lease hath all too short a date. "
) * 40


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A small text for the char-level GPT of :func:`tiny_gpt_settings`."""
    path = tmp_path / "sonnet.txt"
    path.write_text(SONNET)
    return path


def train_losses(run_dir: Path) -> list[float]:
    """Every logged training loss of a `qkvlab train` run, in order (from its metrics.jsonl)."""
    import json

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"train"' in line]


def tiny_gpt_settings(corpus: Path, out: Path, **extra: object) -> dict[str, str]:
    """`qkvlab train` settings for a 2-layer char GPT on ``corpus`` that trains in about a second."""
    settings = {
        "data": f"text:{corpus}",
        "seq_len": "16",
        "batch_size": "8",
        "max_steps": "12",
        "warmup_steps": "2",
        "lr": "3e-3",
        "model.n_layer": "2",
        "model.n_head": "2",
        "model.d_model": "32",
        "model.dropout": "0.1",  # dropout: resume must restore the RNG too
        "log_every": "1",
        "eval_every": "6",
        "eval_batches": "2",
        "spectra_every": "4",
        "checkpoint_every": "4",
        "progress": "false",
        "tensorboard": "false",
        "out": str(out),
    }
    settings.update({k: str(v) for k, v in extra.items()})
    return settings


def tiny_gqa_llama(seed: int = 0, heads: int = 4, kv_heads: int = 2, d_model: int = 32, d_head: int = 8):
    """A 2-layer HF LLaMA with grouped-query attention (4 query heads over 2 KV groups, d_head 8), RoPE."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.LlamaConfig(
        vocab_size=16,
        hidden_size=d_model,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=d_head,
    )
    return tf.LlamaForCausalLM(config)


def byte_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet: the 256 characters a byte-level BPE vocabulary spells bytes with."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def llama_cpp_permute(weight, n_head: int):  # type: ignore[no-untyped-def]
    """llama.cpp's convert_hf_to_gguf ``LlamaModel.permute``, as that converter writes q and k."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_tiny_gguf_llama(path: Path, seed: int = 0, pad: bool = False):  # type: ignore[no-untyped-def]
    """``tiny_gqa_llama`` written as llama.cpp's converter writes a LLaMA: a whole GGUF file with the
    model's metadata, tensors under llama.cpp's names (q and k rows permuted; the attention outputs
    quantised to Q8_0, the rest float32) and a byte-level BPE tokenizer (SmolLM2's kind) whose special
    token ``<|endoftext|>`` is BOS and EOS, with no pad token, or with ``<pad>`` as the pad where
    ``pad``. Returns the HF model it was written from (its o_proj before quantisation)."""
    import gguf
    import numpy as np

    heads, kv_heads, d_head = 4, 2, 8
    tokens = ["<|endoftext|>", *byte_alphabet(), "he", "ll", *(["<pad>"] if pad else [])]
    model = tiny_gqa_llama(seed, heads, kv_heads, 32, d_head)
    model.resize_token_embeddings(len(tokens))

    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    tensors = {
        "token_embd.weight": state["model.embed_tokens.weight"],
        "output_norm.weight": state["model.norm.weight"],
        "output.weight": state["lm_head.weight"],
    }
    names = {
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for i in range(model.config.num_hidden_layers):
        hf = f"model.layers.{i}."
        tensors[f"blk.{i}.attn_q.weight"] = llama_cpp_permute(state[hf + "self_attn.q_proj.weight"], heads)
        tensors[f"blk.{i}.attn_k.weight"] = llama_cpp_permute(state[hf + "self_attn.k_proj.weight"], kv_heads)
        for ours, theirs in names.items():
            tensors[f"blk.{i}.{ours}.weight"] = state[hf + theirs + ".weight"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(model.config.num_hidden_layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_embedding_length(32)
    writer.add_key_length(d_head)
    writer.add_value_length(d_head)
    writer.add_context_length(64)
    writer.add_feed_forward_length(model.config.intermediate_size)
    writer.add_layer_norm_rms_eps(model.config.rms_norm_eps)
    writer.add_rope_dimension_count(d_head)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    types = [gguf.TokenType.NORMAL] * len(tokens)
    types[0] = gguf.TokenType.CONTROL
    if pad:
        types[-1] = gguf.TokenType.CONTROL
        writer.add_pad_token_id(len(tokens) - 1)
    writer.add_token_types(types)
    writer.add_token_merges(["h e", "l l"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    for name, array in tensors.items():
        array = np.ascontiguousarray(array, dtype=np.float32)
        if name.endswith("attn_output.weight"):
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(array, q8), raw_dtype=q8)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model
