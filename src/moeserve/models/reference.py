"""Train the reference model: a small Mixtral-architecture MoE on Python standard-library source.

``moeserve train-tiny --out DIR`` runs :func:`train_reference_model`. It trains a byte-level
BPE tokenizer with ``tokenizers``, then the model with transformers' own Mixtral modules and
its router load-balancing loss, and saves both in HF format. Files are split into train and
held-out sets by a stable hash of their path, so the held-out figures are on unseen files.
This module knows nothing of serving; evaluation of the result lives in ``models.evaluate``.
"""

from __future__ import annotations

import hashlib
import json
import math
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

EOS_TOKEN = "<|endoftext|>"


@dataclass(frozen=True)
class ReferenceModelConfig:
    """Architecture and training budget of the reference model."""

    vocab_size: int = 4096
    """BPE vocabulary, including the end-of-text token."""
    hidden_size: int = 128
    intermediate_size: int = 160
    """Per-expert intermediate size (I)."""
    num_layers: int = 4
    """Decoder layers; every one is an MoE layer."""
    num_heads: int = 4
    num_kv_heads: int = 2
    num_experts: int = 16
    top_k: int = 2
    router_aux_loss_coef: float = 0.02
    """Weight of the load-balancing loss (Switch-style) added to the LM loss."""
    seq_len: int = 256
    batch_size: int = 16
    learning_rate: float = 3e-3
    max_steps: int = 1500
    max_minutes: float = 18.0
    """Training stops at max_steps or after this many minutes, whichever comes first."""
    held_out_every: int = 20
    """One file in this many (by path hash) is held out from training."""
    tokenizer_corpus_bytes: int = 8_000_000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_experts < 2 or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={self.top_k}, num_experts={self.num_experts}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library ``*.py`` files, sorted (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


def is_held_out(path: Path, every: int) -> bool:
    """Stable split by a hash of the path relative to the stdlib root."""
    root = Path(sysconfig.get_paths()["stdlib"])
    digest = hashlib.sha1(str(path.relative_to(root)).encode()).digest()
    return digest[0] % every == 0


def read_texts(files: list[Path]) -> Iterator[str]:
    for path in files:
        try:
            yield path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def split_corpus(every: int) -> tuple[list[Path], list[Path]]:
    files = stdlib_files()
    held = [p for p in files if is_held_out(p, every)]
    train = [p for p in files if not is_held_out(p, every)]
    return train, held


def train_tokenizer(texts: list[str], vocab_size: int):  # -> PreTrainedTokenizerFast
    """Byte-level BPE (GPT-2 style) trained on ``texts``; wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN)


def encode_corpus(tokenizer, texts: Iterator[str]) -> torch.Tensor:
    """All texts as one int32 token stream, each file followed by the end-of-text token."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == 64:
            for row in tokenizer(batch)["input_ids"]:
                ids.extend(row)
                ids.append(eos)
            batch = []
    if batch:
        for row in tokenizer(batch)["input_ids"]:
            ids.extend(row)
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


def build_model(cfg: ReferenceModelConfig, eos_id: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    hf_config = MixtralConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        max_position_embeddings=2048,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        output_router_logits=True,
        tie_word_embeddings=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    torch.manual_seed(cfg.seed)
    return MixtralForCausalLM(hf_config)


@dataclass
class TrainingResult:
    steps: int
    tokens_seen: int
    seconds: float
    final_loss: float
    train_tokens: int
    held_out_tokens: int
    parameters: int
    active_parameters: int


def count_parameters(model, cfg: ReferenceModelConfig) -> tuple[int, int]:
    """(total, active per token): active counts top_k of num_experts routed experts."""
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = total - expert + expert * cfg.top_k // cfg.num_experts
    return total, active


def train_reference_model(out: Path, cfg: ReferenceModelConfig, progress: bool = True) -> TrainingResult:
    """Train tokenizer and model, save them in HF format under ``out`` with ``training.json``."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    train_files, held_files = split_corpus(cfg.held_out_every)
    train_texts = list(read_texts(train_files))
    sample, size = [], 0
    for text in train_texts:
        sample.append(text)
        size += len(text)
        if size >= cfg.tokenizer_corpus_bytes:
            break
    tokenizer = train_tokenizer(sample, cfg.vocab_size)
    train_ids = encode_corpus(tokenizer, iter(train_texts))
    held_ids = encode_corpus(tokenizer, read_texts(held_files))
    model = build_model(cfg, tokenizer.eos_token_id)
    model.train()
    total_params, active_params = count_parameters(model, cfg)

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, cfg.max_steps // 40)

    def lr_at(step: int, elapsed: float) -> float:
        if step < warmup:
            return cfg.learning_rate * (step + 1) / warmup
        # Cosine decay over whichever budget runs out first: steps or wall time.
        by_steps = (step - warmup) / max(1, cfg.max_steps - warmup)
        by_time = elapsed / (cfg.max_minutes * 60)
        progress_fraction = min(1.0, max(by_steps, by_time))
        return cfg.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_fraction)))

    generator = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    deadline = start + cfg.max_minutes * 60
    loss_value = float("nan")
    step = 0
    columns = (
        TextColumn("training"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("train", total=cfg.max_steps, loss=float("nan"))
        while step < cfg.max_steps and time.perf_counter() < deadline:
            starts = torch.randint(0, train_ids.numel() - cfg.seq_len - 1, (cfg.batch_size,), generator=generator)
            batch = torch.stack([train_ids[s : s + cfg.seq_len].long() for s in starts.tolist()])  # [B, S]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, time.perf_counter() - start)
            output = model(input_ids=batch, labels=batch)
            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            loss_value = float(output.loss.detach())
            step += 1
            bar.update(task, advance=1, loss=loss_value)
    seconds = time.perf_counter() - start

    model.eval()
    model.config.output_router_logits = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    result = TrainingResult(
        steps=step,
        tokens_seen=step * cfg.batch_size * cfg.seq_len,
        seconds=round(seconds, 1),
        final_loss=round(loss_value, 4),
        train_tokens=int(train_ids.numel()),
        held_out_tokens=int(held_ids.numel()),
        parameters=total_params,
        active_parameters=active_params,
    )
    (out / "training.json").write_text(
        json.dumps({"config": asdict(cfg), "result": asdict(result), "held_out_every": cfg.held_out_every}, indent=2)
    )
    return result


def write_model_card(out: Path, eval_tokens: int = 65_536) -> dict:
    """Evaluate the trained model in ``out`` on the held-out files and write README.md there.

    Returns the figures written (also saved in ``evaluation.json``).
    """
    from moeserve.models.evaluate import evaluate_tokens
    from moeserve.models.loader import load_model

    training = json.loads((out / "training.json").read_text())
    cfg = ReferenceModelConfig(**training["config"])
    model = load_model(out)
    _, held_files = split_corpus(cfg.held_out_every)
    held_ids = encode_corpus(model.tokenizer, read_texts(held_files))
    quality, stats = evaluate_tokens(model, held_ids, seq_len=cfg.seq_len, max_tokens=eval_tokens, record_routing=True)
    assert stats is not None
    result = training["result"]
    figures = {"quality": quality.to_dict(), "routing": stats.to_dict(), "training": result}
    (out / "evaluation.json").write_text(json.dumps(figures, indent=2))
    rows = "\n".join(
        f"| {layer.layer} | {layer.load_skew:.2f} | {layer.normalized_entropy:.3f} | {layer.temporal_locality:.3f} |"
        for layer in stats.layers
    )
    card = f"""# tiny-moe: moeserve's reference model

A small Mixture-of-Experts language model of Python source, trained from scratch by
`moeserve train-tiny` on this interpreter's standard library (`Lib/**/*.py`), with one file in
{cfg.held_out_every} (by a hash of its path) held out. It is moeserve's embedded default: every command
that takes a model runs on it with nothing downloaded. Licence: Apache-2.0, like moeserve.

## Architecture (transformers `MixtralForCausalLM`)
| field | value |
|---|---|
| decoder layers (all MoE) | {cfg.num_layers} |
| routed experts per layer / top-k | {cfg.num_experts} / {cfg.top_k} |
| hidden size / expert intermediate size | {cfg.hidden_size} / {cfg.intermediate_size} |
| attention heads / KV heads | {cfg.num_heads} / {cfg.num_kv_heads} |
| vocabulary (byte-level BPE, `tokenizers`) | {cfg.vocab_size} |
| parameters (total / active per token) | {result['parameters']:,} / {result['active_parameters']:,} |
| router load-balancing loss coefficient | {cfg.router_aux_loss_coef} |

## Training
| field | value |
|---|---|
| steps x batch x sequence | {result['steps']} x {cfg.batch_size} x {cfg.seq_len} |
| tokens seen | {result['tokens_seen']:,} |
| training tokens available / held-out tokens | {result['train_tokens']:,} / {result['held_out_tokens']:,} |
| final training loss (LM + balancing) | {result['final_loss']} |
| wall time | {result['seconds']:.0f} s on the machine that trained it (2 CPU cores) |
| stopped by | {"the time limit (" + str(cfg.max_minutes) + " min) before max_steps " + str(cfg.max_steps) if result['steps'] < cfg.max_steps else "max_steps"} |

## Held-out quality ({quality.tokens:,} next-token predictions on held-out files)
| metric | value |
|---|---|
| perplexity | {quality.perplexity:.2f} |
| next-token accuracy | {quality.accuracy:.4f} |

## Routing on held-out text
Load skew is max/mean tokens per expert (1.0 = even); temporal locality is the share of a
token's experts that the next token reuses at the same layer (uniform random routing would give
{stats.random_temporal_locality:.3f}).

| layer | load skew (max/mean) | normalised entropy | temporal locality |
|---|---|---|---|
{rows}

Mean: load skew {stats.mean_load_skew:.2f}, temporal locality {stats.mean_temporal_locality:.3f}.

Reproduce: `moeserve train-tiny --out DIR` (then this card is written by the same command).
"""
    (out / "README.md").write_text(card)
    return figures


def reference_split_tokens(tokenizer, held_out: bool, max_tokens: int, every: int = 20) -> torch.Tensor:
    """The first ``max_tokens + 1`` tokens of the standard-library train or held-out split.

    The split is the one ``train-tiny`` used (``every`` as in its config), so held-out tokens are
    from files the reference model never saw. Files are encoded whole, one at a time.
    """
    train, held = split_corpus(every)
    pieces: list[torch.Tensor] = []
    count = 0
    for text in read_texts(held if held_out else train):
        ids = encode_corpus(tokenizer, iter([text]))
        pieces.append(ids)
        count += ids.numel()
        if count > max_tokens:
            break
    return torch.cat(pieces)[: max_tokens + 1]
