"""Tiny decoder models with random weights, saved like a user's local folder (no download, no weights shipped).

The project ships no decoder weights. :func:`tiny_decoder` writes a 2-layer GPT-2 or Llama-style model and
a word-level tokenizer trained on the shipped corpus to a folder, so the decoder paths (``kdeformer.hf``
with ``attn_implementation="kdeformer"``, :func:`~kdeformer.sources.from_pretrained`, ``generate()``) can be
run and tested end to end offline. Its attention is that of random weights: use it to check plumbing,
not to look at what a trained model attends to.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .._checks import check_choice, check_int
from .container import corpus
from .pretrained import _quiet_transformers

TINY_ARCHS = ("gpt2", "llama")
_SPECIALS = {"unk_token": "[UNK]", "pad_token": "[PAD]", "bos_token": "[BOS]", "eos_token": "[EOS]"}


def tiny_tokenizer(max_length: int = 128):
    """A word-level ``PreTrainedTokenizerFast`` trained on :func:`~kdeformer.sources.corpus` (offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token=_SPECIALS["unk_token"]))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    raw.train_from_iterator(corpus(), trainers.WordLevelTrainer(special_tokens=list(_SPECIALS.values())))
    return PreTrainedTokenizerFast(tokenizer_object=raw, model_max_length=max_length, **_SPECIALS)


def _tiny_model(arch: str, vocab: int, positions: int, ids: dict):
    import transformers as tf

    if arch == "gpt2":
        config = tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=positions, **ids)
        return tf.GPT2LMHeadModel(config)
    config = tf.LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=positions, **ids)
    return tf.LlamaForCausalLM(config)  # grouped key/value heads (4 query heads share 2 key/value heads)


def tiny_decoder(folder, arch: str = "gpt2", seed: int = 0, positions: int = 128) -> Path:
    """Save a 2-layer, 4-head, width-32 decoder (random weights, seeded) and its tokenizer to `folder`.

    arch: "gpt2" (GPT2LMHeadModel, learned positions) or "llama" (LlamaForCausalLM: rotary positions,
    grouped key/value heads). Returns the folder, loadable with ``from_pretrained(folder)``.
    """
    check_choice("arch", arch, TINY_ARCHS)
    seed = check_int("seed", seed, minimum=0)
    positions = check_int("positions", positions, minimum=8, maximum=4096)
    tokenizer = tiny_tokenizer(positions)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _tiny_model(arch, len(tokenizer), positions, ids)
    folder = Path(folder).expanduser()
    with _quiet_transformers():  # no progress bar while writing
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder
