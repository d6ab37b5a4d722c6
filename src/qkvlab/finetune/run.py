"""Fine-tune chosen attention matrices of a pretrained HF model: ``qkvlab finetune``.

Targets are roles (q, k, v, o; or "all" for the whole model), mapped to module names per
architecture by ``qkvlab.roles``. ``method=full`` trains those matrices (and their biases) plus the
task head; ``method=lora`` puts PEFT LoRA adapters on exactly those modules (head trained in full,
as PEFT's SEQ_CLS task does). ``lr`` is η_QK; ``lr_ratio`` λ gives η_V = λ·η_QK (paper 001).
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qkvlab.errors import UserError, is_out_of_memory
from qkvlab.finetune.data import LabelledData, load_labelled
from qkvlab.finetune.metrics import classification_metrics, regression_metrics, steps_to_fraction_of_best
from qkvlab.optim import optimizer_settings, param_groups, roles

__all__ = ["FinetuneConfig", "finetune", "load_classifier", "model_path", "target_modules"]

TARGET_ROLES = ("q", "k", "v", "o")


@dataclass
class FinetuneConfig:
    model: str = "minilm"
    data: str = "rotten-tomatoes"
    targets: list[str] = field(default_factory=lambda: ["q", "v"])
    method: str = "lora"  # full | lora
    rank: int = 8
    alpha: float = 16.0
    lora_dropout: float = 0.0
    lr: float = 1e-4  # η_QK: the rate of every trained matrix except V
    lr_ratio: float = 1.0  # λ: η_V = λ · η_QK
    loraplus_ratio: float | None = None
    preset: str | None = None  # an optimiser preset, NAME[:key=value,...]; its settings merge with the above
    weight_decay: float = 0.0
    max_steps: int | None = 300
    epochs: float | None = None
    batch_size: int = 32
    max_length: int = 64
    warmup_ratio: float = 0.06
    eval_every: int = 25
    seed: int = 0
    device: str = "auto"
    max_train_examples: int | None = None  # subsample the training split (quick runs, tests)
    # evaluate the learning curve on a fixed subset of the validation split (the same subset for
    # every run and seed); the test split is always scored in full
    max_val_examples: int | None = None
    save_model: bool = True
    out: str | None = None

    def validate(self) -> None:
        targets = list(self.targets)
        if targets != ["all"]:
            bad = sorted(set(targets) - set(TARGET_ROLES))
            if bad or not targets:
                raise UserError(
                    f"unknown target {', '.join(bad) or '(none)'}; accepted: a subset of q,k,v,o, or all"
                )
        if self.method not in ("full", "lora"):
            raise UserError(f"--method {self.method!r}; accepted: full, lora")
        if self.method == "lora" and targets == ["all"]:
            raise UserError("--targets all is full fine-tuning of everything; use --method full")
        if len(set(targets)) != len(targets):
            raise UserError(
                f"--targets {','.join(targets)} repeats a matrix; accepted: each of q,k,v,o at most once"
            )
        if not 0 < self.lr_ratio < math.inf:
            raise UserError(f"--lr-ratio λ = {self.lr_ratio}; accepted: finite λ > 0 (η_V = λ·η_QK)")
        if not 0 < self.lr < math.inf:
            raise UserError(f"--lr {self.lr}; accepted: finite and > 0")
        if not 0 < self.alpha < math.inf:
            raise UserError(f"--alpha {self.alpha}; accepted: finite and > 0")
        if not 0 <= self.weight_decay < math.inf:
            raise UserError(f"--weight-decay {self.weight_decay}; accepted: finite and ≥ 0")
        if self.loraplus_ratio is not None and not 0 < self.loraplus_ratio < math.inf:
            raise UserError(f"--loraplus-ratio {self.loraplus_ratio}; accepted: finite and > 0")
        from qkvlab.args import MAX_SEED

        if not 0 <= self.seed <= MAX_SEED:
            raise UserError(f"--seed {self.seed}; accepted: an integer in [0, {MAX_SEED}]")
        if self.epochs is not None and not 0 < self.epochs < math.inf:
            raise UserError(f"--epochs {self.epochs:g}; accepted: a finite number > 0")
        if self.max_steps is not None and self.max_steps <= 0:
            raise UserError(f"--max-steps {self.max_steps}; accepted: a positive integer")
        optimizer_settings(self.preset)  # an unknown preset or argument fails before the model loads
        if self.rank <= 0:
            raise UserError(f"--rank {self.rank}; accepted: a positive integer")
        if (self.max_steps is None) == (self.epochs is None):
            raise UserError("give exactly one of --max-steps and --epochs")
        from qkvlab.args import check_outputs

        check_outputs(files=[], folders=[self.out])  # before training, not when the results are written


def model_path(name: str) -> Path:
    """The checkpoint of ``name``: a packaged name (``minilm``, ``mpnet``, ``smollm2-135m`` …), a HF folder, a
    ``.gguf`` file, or a Hub name already in the local cache; a UserError saying what is accepted otherwise
    (pickled weights are never read). A GGUF checkpoint comes back as its file, a HF one as its folder:
    ``load_classifier`` loads either."""
    return _checked(name)[0]


def _checked(name: str) -> tuple[Path, Any]:
    """:func:`model_path`, and for a GGUF file the HF config its check read (None for a folder): reading
    it again costs transformers' GGUF loader as long as the first time (a minute for SmolLM2 on a busy
    2-core machine)."""
    from qkvlab.attention.gguf import is_gguf
    from qkvlab.attention.sources import PACKAGED_MODELS, resolve_packaged

    if name in PACKAGED_MODELS:
        path = resolve_packaged(name)
    else:
        path = Path(name).expanduser()
        if not path.exists():
            from qkvlab.attention.sources import _hub_cache_folder

            path = _hub_cache_folder(name) or path  # a Hub name already in the local cache; never a download
    if path.is_file() and is_gguf(path):
        return path, _check_gguf_loadable(name, path)
    if not (path / "config.json").is_file():
        raise UserError(
            f"--model {name}: not a packaged name ({', '.join(PACKAGED_MODELS)}), a HF model folder with "
            "config.json, nor a GGUF file"
        )
    from qkvlab.attention.sources import _read_safetensors_header, _weight_files

    # safetensors or a one-line refusal: pickled weights are never loaded, and a file that only carries
    # the name (a pickle renamed, a truncated download) is named before transformers reads it
    for file in _weight_files(path):
        _read_safetensors_header(file)
    return path, None


def _check_gguf_loadable(name: str, path: Path) -> Any:
    """A GGUF file transformers can build a sequence classifier from: its config reads (transformers'
    GGUF loader knows the architecture under llama.cpp's name, ``qwen2moe`` included) and maps to a
    ``*ForSequenceClassification`` (mamba and lfm2 load, but have none). ``qkvlab inspect`` reads more.
    Returns that config."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    from qkvlab.attention.gguf import GGUFSource

    def architecture() -> str:  # the file's own name for it, read again only for a refusal
        return GGUFSource(path).architecture or "(none)"

    try:
        hf_config = AutoConfig.from_pretrained(
            path.parent, gguf_file=str(path.resolve()), trust_remote_code=False
        )
    except Exception as exc:  # transformers refuses an unknown architecture with a ValueError, a KeyError …
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"--model {name}: transformers cannot read this GGUF file of architecture {architecture()!r} "
            f"({reason}); `qkvlab inspect` still reads it"
        ) from None
    if type(hf_config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        raise UserError(
            f"--model {name}: a GGUF file of architecture {architecture()!r}, which transformers reads as "
            f"{hf_config.model_type} but has no sequence classifier for; accepted: decoders with one "
            "(llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3, …)"
        )
    return hf_config


def _silence_gguf_bar() -> None:
    """transformers' GGUF loader draws its own tqdm bar, which ``disable_progress_bar`` does not reach;
    like that switch, this holds for the rest of the process."""
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_loader
    from tqdm.auto import tqdm

    if hasattr(gguf_loader, "tqdm"):
        gguf_loader.tqdm = functools.partial(tqdm, disable=True)


def _load_kwargs(path: Path) -> tuple[Path, dict[str, Any]]:
    """``from_pretrained``'s folder and keywords for a checkpoint ``model_path`` returned: a GGUF file is
    read by transformers' GGUF loader (dequantised to float, llama.cpp's Q/K permutation undone), a folder
    from safetensors only (never unpickled: a ``.bin`` can run code when loaded)."""
    if path.is_file():
        try:
            from transformers import GgufConfig
        except ImportError:
            import transformers

            raise UserError(
                f"fine-tuning a GGUF file needs transformers with GgufConfig (tested with 5.23.0); "
                f"this one is {transformers.__version__}"
            ) from None
        # the file by its absolute path: transformers looks a bare name up in the working folder
        # first, so a file of the same name there would give the weights. Dense float weights to train,
        # never GGUF blocks kept packed (transformers keeps them packed where its `kernels` package is
        # installed, and such a model cannot train)
        return path.parent, {
            "gguf_file": str(path.resolve()),
            "quantization_config": GgufConfig(dequantize=True),
        }
    return path, {"use_safetensors": True}


def _plain_model(model: Any) -> Any:
    """A model loaded from GGUF with its weights dequantised, made an ordinary float model where
    transformers left its GGUF loader on it as a "quantizer", which refuses ``save_pretrained`` although
    nothing is quantised any more. transformers 5.23 leaves it when it chose to dequantise by itself
    (no ``GgufConfig`` given) and removes it when ``dequantize=True`` is asked for, as ``_load_kwargs``
    does; this is for the first case and for other versions. Any other model is returned as it is."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(quantizer.quantization_config, "dequantize", False):
        quantizer.remove_quantization_config(model)
    return model


def _pad_like_decoders(tokenizer: Any, model: Any) -> str | None:
    """Give a tokenizer without a pad token (GPT-2, LLaMA, SmolLM2, Qwen …) its EOS token as the pad, as
    HF's run_glue does for GPT-2, and tell the model: a decoder's classifier reads the last token that is
    not the pad, so with right padding it reads each text's own last token. Returns the token chosen, or
    None where the tokenizer had a pad already. Either way the model's pad id becomes the tokenizer's,
    which does the padding (a config whose own pad id differs would count pads as text)."""
    added = None
    if tokenizer.pad_token is None:
        added = tokenizer.eos_token or tokenizer.unk_token
        if added is None:
            raise UserError("the model's tokenizer has no pad, EOS or unknown token to pad batches with")
        tokenizer.pad_token = added
    # the classifier reads the text config's pad id (a composite model's differs from its top config)
    model.config.pad_token_id = tokenizer.pad_token_id
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    return added


def load_classifier(name: str, num_labels: int, **model_kwargs: Any) -> tuple[Any, Any, dict[str, Any]]:
    """The tokenizer and sequence classifier of ``name`` (anything ``model_path`` accepts), ready to
    train: a GGUF file's weights dequantised into an ordinary float model, and a pad token where the
    tokenizer had none. ``model_kwargs`` go to ``from_pretrained`` (``dtype``, ``problem_type`` …).
    Returns them with ``{"checkpoint": "gguf" | "safetensors", "pad_token_added": EOS token or None}``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path, gguf_config = _checked(name)
    folder, source = _load_kwargs(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            folder, trust_remote_code=False, gguf_file=source.get("gguf_file")
        )
    except Exception as exc:  # a GGUF tokenizer that transformers cannot build fails in any way
        if not isinstance(exc, (OSError, ValueError)) and "gguf_file" not in source:
            raise
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"--model {name}: no usable tokenizer there ({reason})") from None
    model_kwargs = {"num_labels": num_labels, **model_kwargs}
    if gguf_config is not None:
        # the config the check read, so the file's metadata is not read a third time (the tokenizer reads
        # it too), given the keywords as the auto class gives them: num_labels, problem_type … onto the
        # config (the labels follow num_labels); dtype to the model alone ("auto" is resolved there)
        dtypes = {k: model_kwargs.pop(k) for k in ("dtype", "torch_dtype") if k in model_kwargs}
        as_dict = {k: v for k, v in gguf_config.to_dict().items() if k not in ("id2label", "label2id")}
        config, model_kwargs = type(gguf_config).from_dict(as_dict, return_unused_kwargs=True, **model_kwargs)
        model_kwargs.update(config=config, **dtypes)
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, trust_remote_code=False, **model_kwargs, **source
    )
    model = _plain_model(model)
    added = _pad_like_decoders(tokenizer, model)
    checkpoint = "gguf" if "gguf_file" in source else "safetensors"
    return tokenizer, model, {"checkpoint": checkpoint, "pad_token_added": added}


def _write_error(exc: Exception, where: Path) -> Exception:
    """An OSError naming ``where`` for a write that failed inside a library (safetensors' "os error 28")."""
    import errno
    import re

    if isinstance(exc, OSError):
        exc.filename = exc.filename or str(where)
        return exc
    code = re.search(r"os error (\d+)", str(exc))
    if code and int(code.group(1)) in errno.errorcode:
        return OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(where))
    return exc


def _device(kind: str) -> torch.device:
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is available; accepted here: --device cpu or auto")
    return torch.device(kind)


def target_modules(model: torch.nn.Module, targets: set[str]) -> list[str]:
    """The module names of ``model`` that hold the roles ``targets`` (``{"q", "v"}``), for PEFT's
    ``LoraConfig(target_modules=…)``; per architecture from the one table (``query``/``value`` on BERT,
    ``q_proj``/``v_proj`` on LLaMA)."""
    role_of = roles(model)
    if any(r == "qkv" for r in role_of.values()):
        raise UserError(
            "this model fuses q/k/v in one projection; LoRA on a subset of them needs them split "
            "(qkvlab.split_fused_qkv) — use --method full, or a model with separate projections"
        )
    modules = sorted(
        {n.removesuffix(".weight") for n, r in role_of.items() if r in targets and n.endswith(".weight")}
    )
    if not modules:
        raise UserError(f"no module of this model has role {', '.join(sorted(targets))}")
    return modules


def _encode(
    tokenizer: Any, texts: list[str], pairs: list[str] | None, max_length: int
) -> dict[str, torch.Tensor]:
    encoded = tokenizer(
        texts, pairs, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt"
    )
    return {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def _subsample(
    texts: list[str], pairs: list[str] | None, labels: np.ndarray, limit: int | None, rng: np.random.Generator
) -> tuple[list[str], list[str] | None, np.ndarray]:
    """At most ``limit`` examples, drawn with ``rng``, kept in their original order."""
    if limit is None or limit >= len(texts):
        return texts, pairs, labels
    keep = np.sort(rng.permutation(len(texts))[:limit])
    return [texts[i] for i in keep], [pairs[i] for i in keep] if pairs is not None else None, labels[keep]


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux ≥ 4.0); False where it can't."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_memory(device: torch.device, rss_reset: bool) -> dict[str, Any]:
    """Peak memory of this run: RSS high-water mark since the reset (else of the whole process)."""
    rss = None
    if rss_reset:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    rss = int(line.split()[1]) / 2**20  # kB → GiB
        except OSError:
            rss = None
    scope = "run"
    if rss is None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB (Linux)
        scope = "process"
    out: dict[str, Any] = {"peak_rss_gib": rss, "peak_rss_scope": scope}
    if device.type == "cuda":
        out["peak_gpu_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def _trim(batch: dict[str, torch.Tensor], left: bool = False) -> dict[str, torch.Tensor]:
    """Cut a batch padded to ``max_length`` down to its longest sequence (dynamic padding).

    For right padding, masked positions never change a real token's output, so this only saves
    flops. For left padding it also shifts the positions of models that number positions from the
    start of the padded row (BERT-style absolute positions); it brings them closer to the
    unpadded ones.
    """
    mask = batch.get("attention_mask")
    if mask is None:
        return batch
    length = int(mask.sum(1).max())
    cut = slice(-length, None) if left else slice(0, length)
    return {k: v[:, cut] for k, v in batch.items()}


@torch.no_grad()
def _evaluate(
    model,
    inputs,
    labels,
    data: LabelledData,
    batch_size: int,
    device,
    left: bool = False,
    counts: bool = False,
) -> dict[str, Any]:
    model.eval()
    # Evaluate in order of length so each batch carries little padding, then restore the order.
    if "attention_mask" in inputs:
        order = torch.argsort(inputs["attention_mask"].sum(1), stable=True)
    else:
        order = torch.arange(len(labels))
    outputs = []
    for start in range(0, len(labels), batch_size * 2):
        index = order[start : start + batch_size * 2]
        batch = _trim({k: v[index] for k, v in inputs.items()}, left)
        outputs.append(model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu())
    model.train()
    logits = torch.empty(len(labels), outputs[0].shape[-1])
    logits[order] = torch.cat(outputs)
    if data.regression:
        return regression_metrics(logits[:, 0].numpy(), labels.astype(np.float64))
    predicted = logits.argmax(-1).numpy()
    metrics: dict[str, Any] = classification_metrics(predicted, labels, data.num_labels)
    if counts:  # how many test examples went to each class (a collapsed run puts them all in one)
        metrics["predicted_counts"] = np.bincount(predicted, minlength=data.num_labels).tolist()
    return metrics


def finetune(config: FinetuneConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run one fine-tuning job; returns (and writes to ``out/result.json``) its summary."""
    config.validate()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if not progress:  # --quiet: no loading/saving bars either
        hf_logging.disable_progress_bar()
        _silence_gguf_bar()
    # PEFT calls a transformers method that transformers has deprecated; nothing the user can act on
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
    device = _device(config.device)
    data = load_labelled(config.data)
    n_train = min(len(data.splits["train"]), config.max_train_examples or len(data.splits["train"]))
    if config.batch_size > n_train:
        raise UserError(
            f"--batch-size {config.batch_size} is larger than the {n_train} training examples; accepted: ≤ {n_train}"
        )
    torch.manual_seed(config.seed)  # before the model: the new classifier head is drawn from it
    np_rng = np.random.default_rng(config.seed)
    tokenizer, model, loaded = load_classifier(
        config.model,
        data.num_labels,
        problem_type="regression" if data.regression else "single_label_classification",
        dtype=torch.float32,  # train in float32 whatever the checkpoint's storage dtype (GGUF: dequantised)
    )
    targets = set(config.targets)
    split_modules: list[str] = []
    if targets != {"all"} and "qkv" in roles(model).values():
        from qkvlab.attention.split import split_fused_qkv

        # per-matrix targets and rates need q, k and v apart (GPT-2, GPT-NeoX per head, Phi-3 blocks);
        # outputs are unchanged, and the saved model is written in the fused layout again
        split_modules = split_fused_qkv(model)
    overrides = {"v": {"lr_scale": config.lr_ratio}} if config.lr_ratio != 1.0 else None
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        modules = target_modules(model, targets)
        # a rank beyond the adapted matrices' size adds nothing but memory (and a huge one cannot be allocated)
        smallest = min(min(model.get_submodule(m).weight.shape) for m in modules)
        if config.rank > smallest:
            raise UserError(
                f"--rank {config.rank} is larger than the adapted matrices ({smallest} on their short side); "
                f"accepted: 1 to {smallest}"
            )
        # the task head trains in full: PEFT's SEQ_CLS default only knows "classifier" and "score", not
        # DistilBERT's pre_classifier or T5's classification_head
        head = sorted({n.rsplit(".", 1)[0] for n, r in roles(model).items() if r == "head" and "." in n})
        lora = LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            lora_dropout=config.lora_dropout,
            target_modules=modules,
            modules_to_save=head or None,
            task_type="SEQ_CLS",
        )
        model = get_peft_model(model, lora)
        lora_modules = sorted(
            n.removesuffix(".lora_A") for n, _ in model.named_modules() if n.endswith(".lora_A")
        )
        groups = param_groups(
            model,
            lr=config.lr,
            weight_decay=config.weight_decay,
            **optimizer_settings(config.preset, overrides=overrides, lora_ratio=config.loraplus_ratio),
        )
    else:
        lora_modules = []
        train = None if targets == {"all"} else targets
        groups = param_groups(
            model,
            lr=config.lr,
            weight_decay=config.weight_decay,
            **optimizer_settings(config.preset, overrides=overrides, train=train),
        )
    model.to(device).train()
    trainable = sum(p.numel() for g in groups for p in g["params"])
    total = sum(p.numel() for p in model.parameters())

    train_texts, train_pairs, train_labels = data.subset("train")
    train_texts, train_pairs, train_labels = _subsample(
        train_texts, train_pairs, train_labels, config.max_train_examples, np_rng
    )
    train_inputs = _encode(tokenizer, train_texts, train_pairs, config.max_length)
    label_dtype = torch.float32 if data.regression else torch.long
    train_y = torch.as_tensor(train_labels, dtype=label_dtype)
    val_texts, val_pairs, val_labels = data.subset("val")
    # the same validation subset for every run and seed
    val_texts, val_pairs, val_labels = _subsample(
        val_texts, val_pairs, val_labels, config.max_val_examples, np.random.default_rng(0)
    )
    val_inputs = _encode(tokenizer, val_texts, val_pairs, config.max_length)
    test_texts, test_pairs, test_labels = data.subset("test")

    left = getattr(tokenizer, "padding_side", "right") == "left"
    n = len(train_y)
    if config.batch_size > n:
        raise UserError(
            f"--batch-size {config.batch_size} is larger than the {n} training examples; accepted: ≤ {n}"
        )
    steps_per_epoch = max(1, n // config.batch_size)
    max_steps = (
        config.max_steps if config.max_steps is not None else math.ceil(config.epochs * steps_per_epoch)
    )
    optimizer = torch.optim.AdamW(groups)
    warmup = int(config.warmup_ratio * max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup else max(0.0, (max_steps - s) / max(1, max_steps - warmup)),
    )
    main_metric = "pearson" if data.regression else "accuracy"
    curve: list[dict[str, float]] = []
    losses: list[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=max_steps,
            desc=f"{config.method} {','.join(config.targets)} λ={config.lr_ratio:g}",
            unit="step",
            leave=False,
        )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_reset = _reset_peak_rss()
    train_seconds = 0.0
    permutations: dict[int, torch.Tensor] = {}

    def batch_indices(step: int) -> torch.Tensor:  # epoch e = k // n uses its own seeded permutation
        positions = torch.arange(step * config.batch_size, (step + 1) * config.batch_size)
        out = torch.empty(config.batch_size, dtype=torch.long)
        for epoch in (positions // n).unique().tolist():
            if epoch not in permutations:
                permutations[epoch] = torch.randperm(
                    n, generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch)
                )
            mask = positions // n == epoch
            out[mask] = permutations[epoch][positions[mask] % n]
        return out

    last_eval = 0
    for step in range(max_steps):
        index = batch_indices(step)
        batch = {
            k: v.to(device) for k, v in _trim({k: v[index] for k, v in train_inputs.items()}, left).items()
        }
        started = time.perf_counter()
        try:
            loss = model(**batch, labels=train_y[index].to(device)).loss
            loss.backward()
        except RuntimeError as exc:  # torch.OutOfMemoryError is one
            if not is_out_of_memory(exc):
                raise
            raise UserError(
                f"out of memory in a training step at --batch-size {config.batch_size} × "
                f"--max-length {config.max_length} ({str(exc).splitlines()[0]}); lower either"
            ) from None
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds += time.perf_counter() - started
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if (step + 1) % config.eval_every == 0 or step + 1 == max_steps:
            metrics = _evaluate(model, val_inputs, val_labels, data, config.batch_size, device, left)
            curve.append({"step": step + 1, "train_loss": float(np.mean(losses[last_eval:])), **metrics})
            last_eval = step + 1
    if bar is not None:
        bar.close()
    test = _evaluate(
        model,
        _encode(tokenizer, test_texts, test_pairs, config.max_length),
        test_labels,
        data,
        config.batch_size,
        device,
        left,
        counts=True,
    )
    test_counts = test.pop("predicted_counts", None)  # None for a regression label
    best = max(c[main_metric] for c in curve)
    result = {
        "schema_version": 1,  # bumped whenever a field changes meaning; reports check it
        "kind": "finetune-run",
        "config": asdict(config),
        "data": data.describe(),
        "splits_used": (
            f"train ({n}): optimisation; val ({len(val_labels)}): learning curve and convergence; "
            f"test ({len(test_labels)}): reported once at the end"
        ),
        "trainable_parameters": trainable,
        "groups": [
            {
                "role": g["role"],
                "lr": g.get("initial_lr", g["lr"]),
                "weight_decay": g["weight_decay"],
                "parameters": sum(p.numel() for p in g["params"]),
            }
            for g in groups
        ],
        "lora_modules": lora_modules,
        "split_modules": split_modules,
        **loaded,  # checkpoint (gguf | safetensors) and pad_token_added (the EOS token padded with, or None)
        "total_parameters": total,
        "seconds_per_step": train_seconds / max_steps,
        **_peak_memory(device, rss_reset),
        "device": str(device),
        "main_metric": main_metric,
        "best_val": best,
        "final_val": curve[-1][main_metric],
        "steps_to_95pct_of_best": steps_to_fraction_of_best([(c["step"], c[main_metric]) for c in curve]),
        "test": test,
        "test_predicted_counts": test_counts,
        "curve": curve,
    }
    if config.out:
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        if config.save_model:
            to_save = model.merge_and_unload() if config.method == "lora" else model
            try:
                to_save.save_pretrained(out / "model")
                tokenizer.save_pretrained(out / "model")
            except Exception as exc:  # safetensors reports a failed write as its own error type
                raise _write_error(exc, out / "model") from None
        from qkvlab.files import write_atomic

        write_atomic(out / "result.json", json.dumps(result, indent=1))
    return result
