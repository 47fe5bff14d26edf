"""Shared fixtures: offline tokenizers and tiny random models of every adapter family."""

from __future__ import annotations

import pytest
import torch
import transformers as T

torch.set_num_threads(1)
T.logging.set_verbosity_error()

FAMILIES = ("gpt2", "gptj", "phi", "llama", "mistral", "qwen2", "gpt_neox")


def _corpus() -> list[str]:
    from pydoc_data.topics import topics

    text = list(topics.values())
    text += ["The Eiffel Tower is located in the city of Paris.",
             "LeBron James plays the sport of basketball.",
             "Danielle Darrieux's mother tongue is French."] * 20
    return text


def _fast_tokenizer(kind: str) -> T.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if kind == "bytelevel":  # GPT-2 style: a leading space is part of the next token
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(_corpus(), trainer)
        return T.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                         bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    # SentencePiece style (LLaMA): "▁" marks word starts, BOS prepended, no byte-level space.
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                     unk_token="<unk>", pad_token="</s>")


@pytest.fixture(scope="session")
def bytelevel_tokenizer():
    return _fast_tokenizer("bytelevel")


@pytest.fixture(scope="session")
def sentencepiece_tokenizer():
    return _fast_tokenizer("sentencepiece")


def tiny_config(family: str, vocab_size: int, n_layers: int = 3):
    h, common = 48, {"vocab_size": vocab_size}
    if family == "gpt2":
        return T.GPT2Config(n_layer=n_layers, n_embd=h, n_head=4, n_positions=128, **common)
    if family == "gptj":
        return T.GPTJConfig(n_layer=n_layers, n_embd=h, n_head=4, rotary_dim=4, n_positions=128,
                            **common)
    if family == "phi":
        return T.PhiConfig(num_hidden_layers=n_layers, hidden_size=h, intermediate_size=96,
                           num_attention_heads=4, **common)
    if family == "gpt_neox":
        return T.GPTNeoXConfig(num_hidden_layers=n_layers, hidden_size=h, intermediate_size=96,
                               num_attention_heads=4, **common)
    cls = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config}[family]
    return cls(num_hidden_layers=n_layers, hidden_size=h, intermediate_size=96,
               num_attention_heads=4, num_key_value_heads=2, **common)


def tiny_model(family: str, vocab_size: int, n_layers: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(tiny_config(family, vocab_size, n_layers))
    return model.eval()


@pytest.fixture
def gpt2_and_tok(bytelevel_tokenizer):
    return tiny_model("gpt2", len(bytelevel_tokenizer)), bytelevel_tokenizer


@pytest.fixture(params=FAMILIES)
def family_model(request, bytelevel_tokenizer, sentencepiece_tokenizer):
    """(family, model, tokenizer) for each family; LLaMA-like ones get the SentencePiece one."""
    fam = request.param
    tok = sentencepiece_tokenizer if fam in ("llama", "mistral", "qwen2") else bytelevel_tokenizer
    return fam, tiny_model(fam, len(tok)), tok


def state_equal(model, reference: dict) -> bool:
    """Bit-for-bit equality of every parameter with a saved state dict."""
    return all(torch.equal(p, reference[n]) for n, p in model.named_parameters())


def snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def replayed_logits(model, adapter, ids):
    """Embed, every block through ``adapter.call_block`` with the recorded arguments, head."""
    from editkit.replay import BlockCalls

    blocks = adapter.blocks(model)
    with torch.no_grad(), BlockCalls(blocks) as rec:
        full = model(ids, use_cache=False).logits
    calls = rec.result()
    with torch.no_grad():
        h = adapter.block_input(calls[0])
        for block, call in zip(blocks, calls, strict=True):
            h = adapter.call_block(block, h, call)
        return adapter.head(model, h), full, calls
