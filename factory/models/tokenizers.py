"""Tokenizers built at run time from a small vocabulary, for the tiny and random profiles.

Every id they produce lies inside the real models' vocabularies, and any ASCII text tokenizes, which is all
a model with random weights needs. Nothing is downloaded."""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path


def write_tiny_clip_tokenizer(target: Path):
    """A byte-level CLIP BPE tokenizer with every byte in its vocabulary, so any prompt tokenizes."""
    from transformers import CLIPTokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    # GPT-2's byte -> unicode table: bytes that are not printable get code points from 256 upwards.
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps(vocab))
        Path(tmp, "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=77)


def tiny_bert_tokenizer(extra_tokens: tuple[str, ...] = (), **kwargs):
    """A WordPiece tokenizer whose vocabulary is every lowercase letter, digit and punctuation mark.

    Each character also exists as a `##` continuation, so any ASCII text tokenizes without [UNK]
    (one token per character), which is all a model with random weights needs.
    """
    from transformers import BertTokenizer

    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *extra_tokens, *chars, *("##" + c for c in chars)]
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)}, **kwargs)


def tiny_t5_tokenizer():
    """A T5 Unigram tokenizer over single characters: any ASCII text tokenizes, ids stay below 100."""
    from transformers import T5Tokenizer

    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def tiny_gemma_tokenizer():
    """A Gemma BPE without merges (one token per character), with Gemma's pad/eos/bos ids 0/1/2."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "▁": 5}
    for c in string.ascii_letters + string.digits + string.punctuation + "\n":
        vocab.setdefault(c, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[])


def char_tokenizer(specials: list[str], **named):
    """A character-level fast tokenizer: a BPE without merges, whose decoder joins characters back."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **named)


def within_vocabulary(size: int):
    """Logits processors for `generate` that never pick an id at or above `size`: a model whose vocabulary
    is larger than its tokenizer's (a random model with a small tokenizer) otherwise generates ids the
    tokenizer decodes to nothing. With a real model and its own tokenizer the mask covers no id."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class KnownIds(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, size:] = -torch.inf
            return scores

    return LogitsProcessorList([KnownIds()])
