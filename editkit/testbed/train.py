"""Train the fact-world tokenizer and a small GPT-2 on the fact-world corpus (CPU).

:func:`train_fact_world` trains a byte-level BPE tokenizer on
:meth:`FactWorld.corpus <editkit.testbed.world.FactWorld.corpus>` with
``tokenizers`` and a small :class:`~transformers.GPT2LMHeadModel` on the same
corpus (plain next-token loss, AdamW, warmup + cosine schedule), and saves both
with ``save_pretrained`` (weights as safetensors) plus ``fact_world.json`` —
the :func:`world_fingerprint` of (world, settings), the settings, the training
time and the recall numbers of :func:`fact_recall`.

:func:`fact_recall` measures how well a model knows the world: a fact counts as
recalled by a prompt when its object has the highest score among all the
relation's objects, the score being the mean log-probability of the tokens of
``" " + object`` given the prompt (the CounterFact convention).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from editkit.hparams import IDENTITY_FIELD
from editkit.testbed.world import FactWorld, _stable_hash

__all__ = [
    "EOS_TOKEN",
    "META_FILE",
    "TrainSettings",
    "build_tokenizer",
    "fact_recall",
    "score_candidates",
    "train_fact_world",
    "world_fingerprint",
]

logger = logging.getLogger(__name__)

#: The only special token; also used as bos, unk and pad.
EOS_TOKEN = "<|endoftext|>"
#: Name of the JSON file with fingerprint, settings and metrics in a model dir.
META_FILE = "fact_world.json"
#: The fact world's identity in ``config.editkit_model`` (``editkit.hparams.IDENTITY_FIELD``):
#: ``save_pretrained`` writes it into ``config.json``, so a saved copy of the fact world keeps
#: its presets without the ``fact_world.json`` sidecar of the directory it was loaded from.
FACT_WORLD_ID = "fact-world"


def mark_fact_world(model: Any, fingerprint: str | None = None) -> None:
    """Record in ``model.config`` that it is the fact-world model (of ``fingerprint``)."""
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, IDENTITY_FIELD, FACT_WORLD_ID)
        if fingerprint is not None:
            config.editkit_world_fingerprint = fingerprint
#: Bumped when the training procedure changes in a way the settings do not show.
TRAIN_FORMAT_VERSION = 1


@dataclass(frozen=True)
class TrainSettings:
    """Everything that defines the trained tokenizer and model (part of the fingerprint).

    The defaults are what the shipped model was trained with; they reach the
    target recall (≥ 0.95 on training templates, ≥ 0.8 on held-out
    paraphrases) in a few minutes on two CPU cores.

    Attributes:
        vocab_size: Target BPE vocabulary size (the corpus saturates ~1500).
        n_layer, n_embd, n_head, n_inner, n_positions: GPT-2 shape (tied
            embeddings, ``gelu_new``, no dropout).
        epochs: Passes over the corpus.
        max_steps: Optional cap on optimizer steps (for quick tests).
        batch_size: Corpus lines per step (right-padded, attention-masked).
        lr, min_lr_ratio, warmup_steps: AdamW peak rate, linear warmup, cosine
            decay to ``min_lr_ratio · lr``.
        weight_decay: On matrices only (not biases or layer norms).
        grad_clip: Max global gradient norm.
        seed: Seed of the weights' init and of the batch order.
        padding_side: Saved default of the tokenizer (not in the fingerprint).
    """

    vocab_size: int = 1024
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_inner: int = 512
    n_positions: int = 64
    epochs: int = 24
    max_steps: int | None = None
    batch_size: int = 64
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    padding_side: str = "right"

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainSettings:
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def world_fingerprint(world: FactWorld, settings: TrainSettings) -> str:
    """Hash of the world's content and of the training settings.

    A saved model whose ``fact_world.json`` carries another fingerprint was
    trained on another world or with other settings, i.e. is stale.
    ``padding_side`` is left out: it does not change the trained weights.
    """
    train = settings.to_dict()
    train.pop("padding_side")
    return _stable_hash(
        {"world": world.fingerprint(), "train": train, "train_format": TRAIN_FORMAT_VERSION}
    )


# --------------------------------------------------------------------- tokenizer
def build_tokenizer(world: FactWorld, vocab_size: int = 1024, padding_side: str = "right") -> Any:
    """Train a byte-level BPE tokenizer on the world's corpus.

    The GPT-2 recipe: ByteLevel pre-tokenizer without prefix space (so ``" x"``
    and ``"x"`` tokenize differently, as in GPT-2), the 256 byte symbols in the
    initial alphabet (every string is encodable), ByteLevel decoder and one
    special token ``<|endoftext|>`` serving as bos, eos, unk and pad.

    Returns:
        A ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(world.corpus(shuffle=False), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        padding_side=padding_side,
        model_max_length=1024,
    )


# ------------------------------------------------------------------------ scoring
@torch.no_grad()
def score_candidates(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    candidates: Sequence[Sequence[str]],
    batch_size: int = 256,
) -> list[list[float]]:
    """Mean log-probability of ``" " + candidate`` after each prompt.

    Args:
        model: A causal LM returning ``.logits``.
        tokenizer: Its tokenizer (prompt and target are tokenized separately and
            concatenated, as editing methods do).
        prompts: The prompts.
        candidates: For each prompt, the candidate continuations (without the
            leading space).
        batch_size: Sequences per forward pass.

    Returns:
        ``scores[i][j]`` for prompt ``i`` and candidate ``j``.
    """
    if len(prompts) != len(candidates):
        raise ValueError("prompts and candidates must have the same length")
    device = next(model.parameters()).device
    cand_ids: dict[str, list[int]] = {}
    for cands in candidates:
        for c in cands:
            if c not in cand_ids:
                cand_ids[c] = tokenizer(" " + c, add_special_tokens=False)["input_ids"]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]

    # Every candidate's first token is scored from the prompt's last position;
    # later tokens (multi-token candidates) need the full sequence.
    seqs: list[tuple[int, int, list[int], int]] = []  # (prompt i, cand j, ids, n_target)
    for i, (pids, cands) in enumerate(zip(prompt_ids, candidates, strict=True)):
        if any(len(cand_ids[c]) > 1 for c in cands):
            for j, c in enumerate(cands):
                seqs.append((i, j, pids + cand_ids[c], len(cand_ids[c])))
        else:
            seqs.append((i, -1, pids, 0))

    scores: list[list[float]] = [[0.0] * len(c) for c in candidates]
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        width = max(len(s[2]) for s in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (_, _, toks, _) in enumerate(chunk):
            ids[r, : len(toks)] = torch.tensor(toks)
            mask[r, : len(toks)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        for r, (i, j, toks, n_target) in enumerate(chunk):
            if j < 0:  # single-token candidates: read them all off the last position
                last = logp[r, len(toks) - 1]
                for jj, c in enumerate(candidates[i]):
                    scores[i][jj] = float(last[cand_ids[c][0]])
            else:
                n_prompt = len(toks) - n_target
                positions = torch.arange(n_prompt - 1, len(toks) - 1)
                targets = torch.tensor(toks[n_prompt:])
                scores[i][j] = float(logp[r, positions, targets].mean())
    return scores


def _recall(
    model: torch.nn.Module,
    tokenizer: Any,
    world: FactWorld,
    items: list[tuple[str, str, str]],
    batch_size: int,
) -> float:
    """Fraction of (prompt, relation, true object) items where the true object scores highest."""
    if not items:
        return float("nan")
    prompts = [p for p, _, _ in items]
    cands = [world.relation(r).objects for _, r, _ in items]
    scores = score_candidates(model, tokenizer, prompts, cands, batch_size=batch_size)
    hits = 0
    for (_, _, obj), sc, cs in zip(items, scores, cands, strict=True):
        best = max(range(len(cs)), key=lambda k: sc[k])
        hits += cs[best] == obj
    return hits / len(items)


def fact_recall(
    model: torch.nn.Module,
    tokenizer: Any,
    world: FactWorld | None = None,
    *,
    max_facts: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, float]:
    """Top-1 recall of the world's facts by ``model``.

    A (prompt, fact) pair is recalled when the true object has the highest
    :func:`score_candidates` score among all objects of the relation.

    Args:
        model: The model (any device; left in its mode, run without grad).
        tokenizer: Its tokenizer.
        world: The world; defaults to ``FactWorld()``.
        max_facts: Evaluate a deterministic random subset of this many facts
            (per group) instead of all of them.
        seed: Seed of that subset.
        batch_size: Sequences per forward pass.

    Returns:
        ``train_template_recall`` — every fact × every training template;
        ``paraphrase_recall`` — eval subjects × held-out paraphrase templates
        (never seen in training); ``prefixed_paraphrase_recall`` — the same
        behind a filler sentence; ``seen_paraphrase_recall`` — train-paraphrase
        subjects × paraphrase templates (seen in training); and the counts
        ``n_train_template`` and ``n_paraphrase``.
    """
    world = world if world is not None else FactWorld()
    rng = random.Random(seed)
    eval_set = set(world.eval_subjects)

    def subset(facts: list[Any]) -> list[Any]:
        if max_facts is None or max_facts >= len(facts):
            return facts
        return sorted(rng.sample(facts, max_facts), key=facts.index)

    all_facts = subset(list(world.facts))
    eval_facts = subset([f for f in world.facts if f.subject in eval_set])
    seen_facts = subset([f for f in world.facts if f.subject not in eval_set])

    def items(facts: list[Any], attr: str, prefix: bool = False) -> list[tuple[str, str, str]]:
        out = []
        for f in facts:
            for k, t in enumerate(getattr(world.relation(f.relation), attr)):
                p = t.format(f.subject)
                if prefix:
                    p = f"{world.fillers[(world.facts.index(f) + k) % len(world.fillers)]} {p}"
                out.append((p, f.relation, f.object))
        return out

    train_items = items(all_facts, "templates")
    para_items = items(eval_facts, "paraphrase_templates")
    was_training = model.training
    model.eval()
    try:
        result = {
            "train_template_recall": _recall(model, tokenizer, world, train_items, batch_size),
            "paraphrase_recall": _recall(model, tokenizer, world, para_items, batch_size),
            "prefixed_paraphrase_recall": _recall(
                model, tokenizer, world, items(eval_facts, "paraphrase_templates", True), batch_size
            ),
            "seen_paraphrase_recall": _recall(
                model, tokenizer, world, items(seen_facts, "paraphrase_templates"), batch_size
            ),
            "n_train_template": float(len(train_items)),
            "n_paraphrase": float(len(para_items)),
        }
    finally:
        model.train(was_training)
    return result


# ----------------------------------------------------------------------- training
def _make_batches(
    lengths: list[int], batch_size: int, gen: torch.Generator
) -> list[list[int]]:
    """Shuffled batches of example indices, grouped by similar length to save padding."""
    order = torch.randperm(len(lengths), generator=gen).tolist()
    group = batch_size * 32
    batches: list[list[int]] = []
    for g in range(0, len(order), group):
        chunk = sorted(order[g : g + group], key=lambda i: lengths[i])
        batches.extend(chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size))
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[p] for p in perm]


def _collate(examples: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for r, e in enumerate(examples):
        ids[r, : len(e)] = torch.tensor(e)
        mask[r, : len(e)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _train_model(
    world: FactWorld, tokenizer: Any, settings: TrainSettings, progress: bool
) -> tuple[Any, float, int, float]:
    """Train the GPT-2; returns (model, seconds, optimizer steps, smoothed final loss)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(settings.seed)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=settings.n_positions,
        n_embd=settings.n_embd,
        n_layer=settings.n_layer,
        n_head=settings.n_head,
        n_inner=settings.n_inner,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)
    model.train()

    examples: list[list[int]] = []
    n_truncated = 0
    for line in world.corpus():
        ids = tokenizer(line, add_special_tokens=False)["input_ids"] + [eos_id]
        if len(ids) > settings.n_positions:
            n_truncated += 1
            ids = ids[: settings.n_positions]
        examples.append(ids)
    if n_truncated:
        logger.warning(
            "%d corpus lines are longer than n_positions=%d tokens and were truncated",
            n_truncated,
            settings.n_positions,
        )
    lengths = [len(e) for e in examples]
    steps_per_epoch = math.ceil(len(examples) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    if settings.max_steps is not None:
        total = min(total, settings.max_steps)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optim = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=settings.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
    )
    warmup = min(settings.warmup_steps, max(1, total // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: _lr_factor(s, total, warmup, settings.min_lr_ratio)
    )
    gen = torch.Generator().manual_seed(settings.seed)
    logger.info(
        "training fact-world GPT-2 (%d params) on %d examples: %d steps, batch %d",
        sum(p.numel() for p in model.parameters()),
        len(examples),
        total,
        settings.batch_size,
    )
    start = time.perf_counter()
    step = 0
    bar = tqdm(total=total, desc="fact world", unit="step", disable=not progress)
    ema: float | None = None
    try:
        while step < total:
            for batch_idx in _make_batches(lengths, settings.batch_size, gen):
                if step >= total:
                    break
                batch = _collate([examples[i] for i in batch_idx], eos_id)
                loss = model(**batch).loss
                optim.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
                optim.step()
                sched.step()
                step += 1
                value = loss.detach().item()
                ema = value if ema is None else 0.98 * ema + 0.02 * value
                bar.update(1)
                if step % 50 == 0 or step == total:
                    bar.set_postfix(loss=f"{ema:.3f}")
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    final = float("nan") if ema is None else ema
    logger.info("trained in %.1f s (%d steps), final loss ≈ %.3f", seconds, step, final)
    model.eval()
    return model, seconds, step, final


def _portable_tokenizer_config(path: Path) -> None:
    """Name the tokenizer class ``PreTrainedTokenizerFast``, which every
    transformers version resolves (v5 would write ``TokenizersBackend``)."""
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _default_permissions(path: Path) -> None:
    """Give ``path`` (made by ``mkdtemp``, mode 0700) and its files the umask's modes."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)
    for f in path.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished directory ``tmp`` to ``final`` (replacing an old one)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except OSError:
            os.replace(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def train_fact_world(
    out_dir: str | os.PathLike[str],
    world: FactWorld | None = None,
    seed: int = 0,
    settings: TrainSettings | None = None,
    *,
    evaluate: bool = True,
    progress: bool = True,
    overwrite: bool = True,
    **overrides: Any,
) -> Path:
    """Train the tokenizer and the GPT-2 of ``world`` and save them to ``out_dir``.

    The directory is written atomically: everything goes into a temporary
    sibling directory that is renamed to ``out_dir`` at the end, so a reader
    never sees a half-written model.

    Args:
        out_dir: Target directory (created; its parent too).
        world: The world; defaults to ``FactWorld()``.
        seed: Training seed (weights init and batch order); overrides
            ``settings.seed``.
        settings: Training settings; defaults to :class:`TrainSettings`.
        evaluate: Run :func:`fact_recall` after training and store the numbers.
        progress: Show a tqdm progress bar.
        overwrite: Replace an existing ``out_dir``; if ``False`` and it exists,
            ``FileExistsError``.
        **overrides: Fields of :class:`TrainSettings` to change
            (e.g. ``max_steps=20, n_layer=2``).

    Returns:
        ``Path(out_dir)``. It holds ``config.json``, ``model.safetensors``,
        the tokenizer files and ``fact_world.json`` (fingerprint, settings,
        world summary, training time, recall).
    """
    world = world if world is not None else FactWorld()
    base = settings if settings is not None else TrainSettings()
    settings = replace(base, seed=seed, **overrides)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    tokenizer = build_tokenizer(world, settings.vocab_size, settings.padding_side)
    model, seconds, steps, final_loss = _train_model(world, tokenizer, settings, progress)
    metrics: dict[str, float] = {}
    if evaluate:
        metrics = fact_recall(model, tokenizer, world)
        logger.info(
            "fact-world recall: training templates %.3f, held-out paraphrases %.3f",
            metrics["train_template_recall"],
            metrics["paraphrase_recall"],
        )
    meta = {
        "world_fingerprint": world_fingerprint(world, settings),
        "world": world.describe(),
        "world_summary": world.summary(),
        "settings": settings.to_dict(),
        "train_seconds": round(seconds, 2),
        "total_seconds": round(time.perf_counter() - t0, 2),
        "steps": steps,
        "final_loss": round(final_loss, 4),
        "torch_num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "metrics": metrics,
    }

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        mark_fact_world(model, meta["world_fingerprint"])
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _portable_tokenizer_config(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _default_permissions(tmp)
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} appeared while training")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved fact-world model to %s", out)
    return out


def load_trained(path: str | os.PathLike, fingerprint: str, device: str = "cpu",
                 padding_side: str | None = None) -> tuple[Any, Any]:
    """The trained world model in ``path`` and its tokenizer: float32, eval mode, marked
    with the world's ``fingerprint`` (see :func:`mark_fact_world`)."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    if padding_side not in (None, "left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    model = GPT2LMHeadModel.from_pretrained(path).float().to(device).eval()
    mark_fact_world(model, fingerprint)
    return model, tokenizer
