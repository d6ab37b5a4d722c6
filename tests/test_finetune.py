"""`qkvlab finetune` on a tiny BERT built from a config and a tiny CSV; `inspect --compare`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from qkvlab.cli import main
from qkvlab.finetune import FinetuneConfig, finetune
from qkvlab.inspection import compare


def _config(tiny_bert, tiny_csv, tmp_path, **changes) -> FinetuneConfig:
    settings = dict(
        model=str(tiny_bert),
        data=f"csv:{tiny_csv}",
        targets=["q", "v"],
        method="full",
        lr=1e-2,
        lr_ratio=4.0,
        max_steps=6,
        eval_every=3,
        batch_size=16,
        max_length=16,
        device="cpu",
        out=str(tmp_path / "run"),
    )
    settings.update(changes)
    return FinetuneConfig(**settings)


def test_full_qv_moves_only_q_v_and_head(tiny_bert, tiny_csv, tmp_path) -> None:
    result = finetune(_config(tiny_bert, tiny_csv, tmp_path), progress=False)
    before = load_file(str(tiny_bert / "model.safetensors"))
    after = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    for name, tensor in before.items():
        tuned = after[f"bert.{name}"] if f"bert.{name}" in after else after[name]
        moved = not torch.equal(tensor, tuned)
        should_move = ".attention.self.query." in name or ".attention.self.value." in name
        assert moved == should_move, name
    # parameter count: per layer W_q, b_q, W_v, b_v (32·32 + 32 each), plus the classifier (32·2 + 2)
    assert result["trainable_parameters"] == 2 * 2 * (32 * 32 + 32) + 32 * 2 + 2
    lrs = {(g["role"]): g["lr"] for g in result["groups"]}
    assert lrs["v"] == pytest.approx(4 * lrs["q"]) and lrs["q"] == 1e-2 and lrs["head"] == 1e-2
    assert [c["step"] for c in result["curve"]] == [3, 6]
    assert set(result["test"]) == {"accuracy", "macro_f1", "mcc"}
    assert sum(result["test_predicted_counts"]) == 20 and len(result["test_predicted_counts"]) == 2
    assert 1 <= result["steps_to_95pct_of_best"] <= 6
    assert result["peak_rss_gib"] > 0 and result["seconds_per_step"] > 0
    if sys.platform == "linux":  # the peak of this run, not of the whole process so far
        assert result["peak_rss_scope"] == "run"
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["trainable_parameters"] == result["trainable_parameters"] and saved["schema_version"] == 1

    # what changed, per head: q and v (and their products), never k or o
    report = compare(tiny_bert, tmp_path / "run" / "model")
    by = {p: [r for r in report.heads if r["product"] == p] for p in ("dq", "dk", "dv", "do", "dqk", "dov")}
    assert all(r["rank"] > 0 for r in by["dq"] + by["dv"] + by["dqk"] + by["dov"])
    assert all(r["rank"] == 0 and r["nuclear_norm"] == 0 for r in by["dk"] + by["do"])
    assert all(r["rank"] <= 8 for r in by["dqk"])  # ΔW_KᵀW_Q = W_Kᵀ ΔW_Q here: rank ≤ d_head


def test_lora_adapters_only_on_chosen_roles(tiny_bert, tiny_csv, tmp_path) -> None:
    result = finetune(
        _config(tiny_bert, tiny_csv, tmp_path, method="lora", rank=2, targets=["q", "v"], save_model=False),
        progress=False,
    )
    modules = result["lora_modules"]
    assert len(modules) == 4 and all(m.endswith((".query", ".value")) for m in modules)
    lrs = {}
    for g in result["groups"]:
        lrs.setdefault(g["role"], set()).add(g["lr"])
    assert lrs["q"] == {1e-2} and len(lrs["v"]) == 1 and lrs["v"].pop() == pytest.approx(4e-2)
    # LoRA parameters: A (r × d) and B (d × r) per adapted module, plus the trainable classifier copy
    assert result["trainable_parameters"] == 4 * (2 * 32 + 32 * 2) + 32 * 2 + 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--targets", "q,x"], "unknown target x; accepted: a subset of q,k,v,o, or all"),
        (["--lr-ratio", "0"], "λ = 0.0; accepted: finite λ > 0"),
        (["--lr-ratio", "-2"], "accepted: finite λ > 0"),
        (["--lr", "inf"], "--lr inf; accepted: finite and > 0"),
        (["--alpha", "nan"], "--alpha nan; accepted: finite and > 0"),
        (["--targets", "q,q"], "--targets q,q repeats a matrix"),
        (["--seed", "-1"], "--seed -1; accepted: an integer in [0, 2147483647]"),
        (["--epochs", "0"], "--epochs 0; accepted: a finite number > 0"),
        (["--epochs", "nan"], "--epochs nan; accepted: a finite number > 0"),
        (["--data", "csv:{missing_label}"], "missing column label"),
        (["--data", "csv:{empty}"], "the file is empty"),
        (["--data", "imdb"], "unknown data 'imdb'; accepted: rotten-tomatoes"),
        (["--model", "{nowhere}"], "not a packaged name"),
    ],
)
def test_bad_finetune_input_is_one_line_exit_2(args, message, tiny_bert, tiny_csv, tmp_path, capsys) -> None:
    (tmp_path / "nolabel.csv").write_text("text,stars\nnice,5\n")
    (tmp_path / "empty.csv").write_text("text,label\n")
    fill = {
        "missing_label": tmp_path / "nolabel.csv",
        "empty": tmp_path / "empty.csv",
        "nowhere": tmp_path / "nowhere",
    }
    args = [a.format(**fill) for a in args]
    base = [
        "finetune",
        "--model",
        str(tiny_bert),
        "--data",
        f"csv:{tiny_csv}",
        "--max-steps",
        "2",
        "--quiet",
        "--no-save",
    ]
    rc = main(base + args)
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_cli_compare_prints_and_writes(tiny_bert, tiny_csv, tmp_path, capsys) -> None:
    finetune(_config(tiny_bert, tiny_csv, tmp_path, targets=["v"], max_steps=2, eval_every=2), progress=False)
    capsys.readouterr()
    out = tmp_path / "delta.json"
    assert (
        main(["inspect", str(tiny_bert), "--compare", str(tmp_path / "run" / "model"), "--json", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "what fine-tuning changed" in printed and "dqk ‖·‖_*" in printed
    data = json.loads(out.read_text())
    products = {h["product"] for h in data["heads"]}
    assert products == {"dqk", "dov", "dq", "dk", "dv", "do"}
    moved = {h["product"] for h in data["heads"] if h["rank"]}
    assert moved == {"dov", "dv"}  # only V was trained: W_K, W_Q, P unchanged, so only OV changed
    # --plot draws the change (it used to write nothing), and `report` takes the compare JSON
    plots = tmp_path / "plots"
    args = ["inspect", str(tiny_bert), "--compare", str(tmp_path / "run" / "model"), "--plot", str(plots)]
    assert main(args) == 0
    # only V trained: ΔQK is zero, so it gets no singular-value figure (the heatmap says "no change")
    assert sorted(p.name for p in plots.iterdir()) == ["change_heatmap.png", "singular_values_dov.png"]
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    assert "## Change: delta" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.parametrize("side", ["right", "left"])
def test_dynamic_padding_leaves_logits_and_metrics_unchanged(tiny_bert, side) -> None:
    from qkvlab.finetune.data import LabelledData
    from qkvlab.finetune.run import _encode, _evaluate, _trim

    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_bert)
    tokenizer.padding_side = side
    model = tf.AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=1).eval()
    torch.nn.init.normal_(model.classifier.weight, std=3.0, generator=torch.Generator().manual_seed(0))
    texts = ["good", "the movie was very bad not great", "a plot", "the actor is fine very fine"]
    inputs = _encode(tokenizer, texts, None, 32)
    assert inputs["input_ids"].shape[1] == 32
    trimmed = _trim(inputs, left=side == "left")
    # the same tensors as padding to the longest text in the first place
    longest = tokenizer(texts, padding="longest", return_tensors="pt")
    assert trimmed.keys() == inputs.keys()
    for key, value in trimmed.items():
        assert torch.equal(value, longest[key]), key
    assert trimmed["input_ids"].shape[1] < 32
    with torch.no_grad():
        full = model(**inputs).logits
        short = model(**trimmed).logits
    if side == "right":  # (left padding shifts BERT's absolute positions, so there it changes logits)
        torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-5)

    if side == "left":
        return
    # _evaluate sorts by length for batching; predictions must come back in the data's order:
    # scored against the untrimmed logits as regression targets, Pearson is 1.
    target = full[:, 0].numpy()
    assert target.std() > 1e-3  # distinct enough that a permutation would show
    data = LabelledData(name="t", texts=texts, pairs=None, labels=target, label_names=None, splits={})
    metrics = _evaluate(model, inputs, target, data, batch_size=1, device=torch.device("cpu"))
    assert metrics["pearson"] == pytest.approx(1.0, abs=1e-4)


def test_repro_grid_resumes_refuses_other_settings_and_summarizes(tiny_bert, tiny_csv, tmp_path) -> None:
    from qkvlab.errors import UserError
    from qkvlab.repro.paper001.pilot import LR, GridPoint, aggregate, run_grid
    from qkvlab.repro.paper001.render import plot_convergence, summarize

    points = [
        GridPoint("rotten-tomatoes", ("q", "v"), "lora", 1.0),
        GridPoint("rotten-tomatoes", ("q", "v"), "lora", 4.0),
        GridPoint("rotten-tomatoes", ("q", "k", "v"), "full", 1.0),
        GridPoint("rotten-tomatoes", ("q", "k", "v"), "lora", 1.0),
    ]
    common = dict(
        model=str(tiny_bert),
        points=points,
        data_sources={"rotten-tomatoes": f"csv:{tiny_csv}"},
        max_steps=6,
        eval_every=3,
        batch_size=8,
        echo=lambda *_: None,
    )
    out = tmp_path / "grid"
    first = run_grid(out, [0], jobs=2, **common)  # two spawned worker processes, one run each
    assert [r["status"] for r in first] == ["ran"] * 4
    second = run_grid(out, [0, 1], **common)  # in-process; seed 0 is already done
    assert [r["status"] for r in second] == ["skipped (complete)"] * 4 + ["ran"] * 4
    assert len(list((out / "runs").glob("*/result.json"))) == 8
    # an interrupted grid: one run lost its result; only that one runs again
    (out / "runs" / points[1].name(1) / "result.json").unlink()
    again = run_grid(out, [0, 1, 1], jobs=2, **common)  # a repeated seed is run once
    assert [r["status"] for r in again].count("ran") == 1 and len(again) == 8
    assert again[5]["status"] == "ran" and again[5]["name"] == points[1].name(1)
    sessions = json.loads((out / "grid.json").read_text())["sessions"]
    assert [s["finished"] for s in sessions] == [True, True, True] and [s["jobs"] for s in sessions] == [
        2,
        1,
        2,
    ]
    with pytest.raises(UserError, match="max_steps 6 -> 7"):
        run_grid(out, [0], **{**common, "max_steps": 7})

    rows = {r["label"]: r for r in aggregate(out)}
    qv4 = rows["rotten-tomatoes lora QV λ=4"]
    assert qv4["seeds"] == [0, 1] and qv4["curve"]["step"] == [3, 6]
    assert qv4["lr"] == LR["lora"] and rows["rotten-tomatoes full QKV λ=1"]["lr"] == LR["full"]
    results = [json.loads((out / "runs" / points[1].name(s) / "result.json").read_text()) for s in (0, 1)]
    assert qv4["test"]["accuracy"]["mean"] == pytest.approx(sum(r["test"]["accuracy"] for r in results) / 2)
    group_lrs = {g["role"]: g["lr"] for g in results[0]["groups"]}
    assert group_lrs["v"] == pytest.approx(4 * group_lrs["q"])
    table = summarize(out)
    assert table.count("\n| rotten-tomatoes") == 4 and "| 2 |" in table
    from qkvlab.repro.paper001.pilot import best_lambda
    from qkvlab.repro.paper001.render import claims_markdown

    final = {
        lam: sum(
            json.loads((out / "runs" / p.name(s) / "result.json").read_text())["final_val"] for s in (0, 1)
        )
        for lam, p in ((1.0, points[0]), (4.0, points[1]))
    }
    assert best_lambda(out, [0, 1, 2]) is None  # no λ has all three seeds
    assert best_lambda(out, [0, 1]) == max(final, key=final.get)
    assert json.loads((out / "tweet_lambda.json").read_text())["lambda"] == max(final, key=final.get)

    claims = claims_markdown(out)
    assert (
        "### QV vs QKV" in claims
        and "| lora | 4 |" in claims
        and "(2/2 seeds > 0)" not in claims.split("| lora | 1 |")[0]
    )
    assert "### V vs K" not in claims  # no V or K runs in this grid: no empty section
    written = plot_convergence(out, tmp_path / "plots")
    assert {p.name for p in written} == {
        "convergence_rotten-tomatoes_full.png",
        "convergence_rotten-tomatoes_lora.png",
    }
    assert all(p.stat().st_size > 10_000 for p in written)


def test_repro_cli_bad_input_is_one_line_exit_2(tmp_path, capsys) -> None:
    assert main(["repro", "finetune", "--summary-only", "--out", str(tmp_path / "none")]) == 2
    assert main(["repro", "finetune", "--seeds", "a,b", "--out", str(tmp_path / "x")]) == 2
    assert main(["repro", "finetune", "--seeds", "0,-1", "--out", str(tmp_path / "x")]) == 2
    (tmp_path / "file").write_text("")
    assert (
        main(["repro", "finetune", "--plot", str(tmp_path / "file" / "plots"), "--out", str(tmp_path / "x")])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and "holds no finished runs" in err[0] and "comma-separated integers" in err[1]
    assert "integers in [0, 2147483647]" in err[2] and "is a file; accepted: a folder path" in err[3]
    assert not (tmp_path / "x").exists()  # refused before any run


def test_trainer_example_trains_lora_on_q_v_with_v_at_lambda_times_the_rate(
    tiny_bert, tiny_csv, tmp_path
) -> None:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "examples" / "finetune_with_trainer.py"
    spec = importlib.util.spec_from_file_location("finetune_with_trainer", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    trainer = example.main(
        [
            "--model",
            str(tiny_bert),
            "--data",
            f"csv:{tiny_csv}",
            "--max-steps",
            "6",
            "--batch-size",
            "8",
            "--lr",
            "1e-3",
            "--ratio",
            "4",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    adapted = {n for n, p in trainer.model.named_parameters() if p.requires_grad and "lora_" in n}
    assert adapted and all(".query." in n or ".value." in n for n in adapted)
    assert any(".value." in n for n in adapted) and any(".query." in n for n in adapted)
    lrs = {}
    for group in trainer.optimizer.param_groups:
        lrs.setdefault(group["role"], set()).add(group["initial_lr"])
    assert sorted(lrs["v"]) == pytest.approx([4e-3]) and sorted(lrs["q"]) == pytest.approx([1e-3])
    history = trainer.state.log_history
    assert any("eval_accuracy" in entry for entry in history)  # validation curve during training
    assert "test_accuracy" in history[-1] and "test_mcc" in history[-1]  # test once, at the end
    assert (tmp_path / "run" / "spectra.jsonl").is_file()


def test_val_subset_draws_the_curve_and_test_stays_whole(tiny_bert, tiny_csv, tmp_path) -> None:
    results = [
        finetune(
            _config(
                tiny_bert,
                tiny_csv,
                tmp_path / str(seed),
                max_val_examples=7,
                seed=seed,
                save_model=False,
                max_steps=2,
                eval_every=2,
            ),
            progress=False,
        )
        for seed in (0, 1)
    ]
    for result in results:
        assert "val (7)" in result["splits_used"] and "test (20)" in result["splits_used"]


def test_preset_merges_with_the_v_rate_per_key(tiny_bert, tiny_csv, tmp_path) -> None:
    """decoupled-attn:attn_weight_decay=0 plus η_V = 4·η_QK: W_V keeps the preset's zero decay."""
    config = _config(
        tiny_bert,
        tiny_csv,
        tmp_path,
        weight_decay=0.1,
        preset="decoupled-attn:attn_weight_decay=0",
        max_steps=2,
    )
    result = finetune(config, progress=False)
    v = next(g for g in result["groups"] if g["role"] == "v")
    q = next(g for g in result["groups"] if g["role"] == "q")
    assert v["weight_decay"] == 0.0 and q["weight_decay"] == 0.0 and v["lr"] == pytest.approx(4 * q["lr"])
    assert {g["role"] for g in result["groups"]} == {"q", "v", "head"}
    from qkvlab.errors import UserError

    with pytest.raises(UserError, match="unknown preset"):
        _config(tiny_bert, tiny_csv, tmp_path, preset="nope").validate()


def test_cli_finetune_prints_its_numbers_and_reports(tiny_bert, tiny_csv, tmp_path, capsys) -> None:
    run = tmp_path / "ft"
    args = ["finetune", "--model", str(tiny_bert), "--data", f"csv:{tiny_csv}", "--targets", "q,v"]
    assert (
        main([*args, "--max-steps", "4", "--eval-every", "2", "--quiet", "--no-save", "--out", str(run)]) == 0
    )
    printed = capsys.readouterr().out.splitlines()
    result = json.loads((run / "result.json").read_text())
    assert result["kind"] == "finetune-run" and result["schema_version"] == 1
    assert printed[1].startswith(f"lora q,v λ=1: {result['trainable_parameters']:,} of ")
    assert printed[2].startswith(f"val {result['main_metric']}: best {result['best_val']:.4f}")
    assert printed[-1] == f"wrote {run}/result.json"
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Fine-tuning" in md and "| ft | lora | q,v |" in md


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fused_families_are_split_for_per_matrix_targets_and_saved_fused(
    method, tiny_bert, tiny_csv, tmp_path
) -> None:
    """GPT-NeoX fuses q, k and v per head: `--targets q,v` splits them first (outputs unchanged), trains
    exactly q and v, and saves an ordinary GPT-NeoX checkpoint."""
    folder = _tiny_model_folder("gpt-neox", tiny_bert, tmp_path / "neox")
    result = finetune(
        _config(folder, tiny_csv, tmp_path, method=method, rank=2, save_model=True), progress=False
    )
    assert result["split_modules"] == [f"gpt_neox.layers.{i}.attention.query_key_value" for i in range(3)]
    trained = {g["role"] for g in result["groups"]}
    assert {"q", "v"} <= trained and not trained & {"k", "o", "qkv"}
    if method == "lora":
        assert all(m.endswith(("query_key_value.q", "query_key_value.v")) for m in result["lora_modules"])
    saved = tf.GPTNeoXForSequenceClassification.from_pretrained(
        tmp_path / "run" / "model", use_safetensors=True
    )
    names = {n for n, _ in saved.named_parameters()}
    assert "gpt_neox.layers.0.attention.query_key_value.weight" in names  # fused again on disk


def _tiny_model_folder(kind: str, tiny_bert: Path, folder: Path) -> Path:
    """A tiny HF model of ``kind`` (conftest.tiny_hf_model) saved with the tiny word-level tokenizer."""
    import shutil

    from conftest import tiny_hf_model

    tiny_hf_model(kind).save_pretrained(folder)
    for file in tiny_bert.iterdir():
        if file.name.startswith(("tokenizer", "special", "vocab")):
            shutil.copy(file, folder / file.name)
    return folder


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("kind", ["opt", "phi3", "distilbert", "t5", "mpnet"])
def test_every_family_fine_tunes_q_v_and_its_head(kind, method, tiny_bert, tiny_csv, tmp_path) -> None:
    """--targets q,v trains exactly q, v and the task head (DistilBERT's pre_classifier and T5's
    classification_head included: they were frozen before), whether the projections are separate
    (OPT, DistilBERT, T5, MPNet) or fused (Phi-3, split first)."""
    folder = _tiny_model_folder(kind, tiny_bert, tmp_path / kind)
    result = finetune(
        _config(folder, tiny_csv, tmp_path, method=method, rank=2, save_model=False), progress=False
    )
    assert {g["role"] for g in result["groups"]} == {"q", "v", "head"}
    assert bool(result["split_modules"]) == (kind == "phi3")
    if method == "lora":
        assert result["lora_modules"] and all(
            m.endswith(("q", "v", "q_proj", "v_proj", "q_lin", "v_lin")) for m in result["lora_modules"]
        )


@pytest.mark.parametrize(("method", "pad"), [("full", False), ("lora", False), ("full", True)])
def test_a_gguf_decoder_fine_tunes_q_v_with_its_own_tokenizer_and_pad(
    method, pad, tiny_csv, tmp_path, monkeypatch, capsys
) -> None:
    """A LLaMA GGUF (q and k permuted as llama.cpp writes them, o in Q8_0; a byte-level tokenizer with no
    pad token, as GPT-2's, or with one, as the packaged decoders') fine-tunes as a HF folder does: the
    tokenizer comes from the file, batches pad with EOS where it has no pad, exactly q, v and the head
    train, and the saved model is the file's model (o dequantised) with only q and v moved. It is read
    from its own path, not from a file of the same name in the working folder."""
    import gguf

    from conftest import write_tiny_gguf_llama

    (tmp_path / "model").mkdir()
    (tmp_path / "elsewhere").mkdir()
    original = write_tiny_gguf_llama(tmp_path / "model" / "tiny.gguf", pad=pad)
    write_tiny_gguf_llama(tmp_path / "elsewhere" / "tiny.gguf", seed=1, pad=pad)  # a decoy
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = finetune(
        _config(tmp_path / "model" / "tiny.gguf", tiny_csv, tmp_path, method=method, rank=2, save_model=True),
        progress=False,
    )
    assert "GGUF tensors" not in capsys.readouterr().err  # quiet: not even transformers' GGUF bar
    assert result["checkpoint"] == "gguf"
    assert result["pad_token_added"] == (None if pad else "<|endoftext|>")
    assert {g["role"] for g in result["groups"]} == {"q", "v", "head"}
    saved = tf.LlamaForSequenceClassification.from_pretrained(
        tmp_path / "run" / "model", use_safetensors=True
    )
    tokenizer = tf.AutoTokenizer.from_pretrained(tmp_path / "run" / "model")
    assert tokenizer.pad_token == ("<pad>" if pad else "<|endoftext|>")
    assert saved.config.pad_token_id == tokenizer.pad_token_id
    q8 = gguf.GGMLQuantizationType.Q8_0
    for mine, theirs in zip(saved.model.layers, original.model.layers, strict=True):
        # k came back un-permuted and untouched (and from the file asked for); q and v moved
        assert torch.equal(mine.self_attn.k_proj.weight, theirs.self_attn.k_proj.weight)
        assert not torch.equal(mine.self_attn.q_proj.weight, theirs.self_attn.q_proj.weight)
        assert not torch.equal(mine.self_attn.v_proj.weight, theirs.self_attn.v_proj.weight)
        # o is the Q8_0 block's dequantised value, not the float32 it was made from
        o = theirs.self_attn.o_proj.weight.detach().numpy()
        grid = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(o, q8), q8))
        assert torch.equal(mine.self_attn.o_proj.weight, grid.reshape(o.shape))
        assert not torch.equal(mine.self_attn.o_proj.weight, theirs.self_attn.o_proj.weight)
    # the classifier reads each text's own last token: a short text scores the same alone and padded
    # beside a longer one
    saved.eval()
    with torch.no_grad():
        both = saved(
            **tokenizer(["good film", "a long and rather dull film"], padding=True, return_tensors="pt")
        )
        alone = saved(**tokenizer(["good film"], return_tensors="pt"))
    torch.testing.assert_close(both.logits[0], alone.logits[0], rtol=1e-5, atol=1e-5)


def test_load_classifier_reads_a_gguf_files_config_once_and_builds_what_from_pretrained_does(
    tmp_path, monkeypatch
) -> None:
    """transformers' GGUF loader reads a file's whole metadata for its config (a minute for SmolLM2 on a
    busy machine): the check's config is handed on, so the model does not read it again, and the model is
    the one from_pretrained builds from the file with the same keywords."""
    import transformers.modeling_gguf_pytorch_utils as loader

    from qkvlab.finetune import load_classifier

    from conftest import write_tiny_gguf_llama

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf_llama(path)
    real, reads = loader.load_gguf_checkpoint, []

    def counting(*args, **kwargs):
        reads.append(kwargs.get("return_tensors", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(loader, "load_gguf_checkpoint", counting)
    keywords = {"problem_type": "single_label_classification", "dtype": torch.float64}
    torch.manual_seed(0)
    _, model, info = load_classifier(str(path), 3, **keywords)
    assert reads.count(False) == 2  # the check's and the tokenizer's, not the model's as well
    assert info["checkpoint"] == "gguf" and model.dtype == torch.float64
    torch.manual_seed(0)
    reference = tf.AutoModelForSequenceClassification.from_pretrained(
        tmp_path,
        gguf_file=str(path),
        num_labels=3,
        quantization_config=tf.GgufConfig(dequantize=True),
        **keywords,
    )
    mine, theirs = model.config.to_dict(), reference.config.to_dict()
    assert mine == {**theirs, "pad_token_id": mine["pad_token_id"]}  # the pad id is set on ours after
    assert model.config.num_labels == 3 and model.config.problem_type == "single_label_classification"
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    _, auto, _ = load_classifier(str(path), 3, dtype="auto")  # resolved by the model, as from_pretrained does
    assert (
        auto.dtype
        == tf.AutoModelForSequenceClassification.from_pretrained(
            tmp_path,
            gguf_file=str(path),
            num_labels=3,
            dtype="auto",
            quantization_config=tf.GgufConfig(dequantize=True),
        ).dtype
    )


@pytest.mark.parametrize(
    ("architecture", "message"),
    [
        ("rwkv6", "transformers cannot read this GGUF file of architecture 'rwkv6'"),
        ("mamba", "architecture 'mamba', which transformers reads as mamba but has no sequence classifier"),
    ],
)
def test_a_gguf_transformers_cannot_classify_with_is_one_line_exit_2(
    architecture, message, tiny_csv, tmp_path, capsys
) -> None:
    import gguf
    import numpy as np

    from conftest import byte_alphabet

    tokens = ["<|endoftext|>", *byte_alphabet(), "he"]
    writer = gguf.GGUFWriter(str(tmp_path / "model.gguf"), architecture)
    writer.add_block_count(1)
    writer.add_embedding_length(16)
    writer.add_context_length(64)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL, *[gguf.TokenType.NORMAL] * (len(tokens) - 1)])
    writer.add_token_merges(["h e"])
    writer.add_tensor("token_embd.weight", np.ones((len(tokens), 16), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    rc = main(
        [
            "finetune",
            "--model",
            str(tmp_path / "model.gguf"),
            "--data",
            f"csv:{tiny_csv}",
            "--quiet",
            "--no-save",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert message in err, err
