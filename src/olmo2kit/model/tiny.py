"""Tiny random OLMo 2 checkpoints, built locally, for tests and offline demos.

A tiny checkpoint is a real `Olmo2ForCausalLM` in safetensors with a byte-level BPE
tokenizer trained here on a few paragraphs. It carries OLMo 2's special tokens
(`<|endoftext|>` as bos/eos, `<|pad|>` as pad) and, for `instruct=True`, the OLMo 2
chat template, so plain `AutoModelForCausalLM` / `AutoTokenizer` load it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from olmo2kit.errors import Olmo2KitError
from olmo2kit.files import cannot_write, make_output_dir
from olmo2kit.model.chat_template import OLMO2_CHAT_TEMPLATE

EOS = "<|endoftext|>"
PAD = "<|pad|>"
# OLMo 2's pre-tokenizer: this split pattern (cl100k's), then byte-level bytes, as the OLMo 2 tokenizer.json
# (allenai/dolma2-tokenizer) declares it; the tiny tokenizer splits text the same way.
OLMO2_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                       r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# The file build_tiny leaves in each checkpoint: what it built, and the files it wrote.
MARKER = "olmo2kit-tiny.json"

# Architecture of the tiny model: OLMo 2's layout (post-norm blocks, QK-norm, untied
# embeddings) at toy width, with grouped-query attention as in the 32B.
TINY_ARCH = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)
TINY_VOCAB = 512
TINY_HEAD_DIM = TINY_ARCH["hidden_size"] // TINY_ARCH["num_attention_heads"]  # 16

_CORPUS = """\
Language modeling is the task of predicting the next word in a sequence of text.
OLMo 2 is a family of fully open language models trained on trillions of tokens.
The models are released with their data, code, training logs and intermediate checkpoints,
so that researchers can study how a language model learns during training.
A transformer reads a sequence of tokens and computes attention between every pair of positions.
Each layer normalizes its outputs, and the final layer predicts a distribution over the vocabulary.
<|system|>
You are a helpful assistant.
<|user|>
What is the capital of France?
<|assistant|>
The capital of France is Paris.
<|user|>
Write a short poem about the sea.
<|assistant|>
The sea is wide, the sea is deep, it sings the sailors into sleep.
The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 100 1000.
Hello, world! How are you today? I am fine, thank you. Numbers, letters, and symbols: + - * / = ( ) [ ] { }.
"""


def build_tokenizer(instruct: bool = False):
    """A byte-level BPE tokenizer with OLMo 2's pre-tokenizer and special tokens, trained on a small corpus."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(OLMO2_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=TINY_ARCH["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    if instruct:
        tokenizer.chat_template = OLMO2_CHAT_TEMPLATE
    return tokenizer


def write_olmo2_sized_tokenizer(path: Path, size: int = 100_278) -> Path:
    """A byte-level BPE tokenizer.json of `size` tokens, as many as OLMo 2's (its merges made up), at `path`: for
    measuring what a tokenizer of real size costs (soup's tokenizer check) without downloading OLMo 2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab, merges = {t: i for i, t in enumerate(tokens)}, []
    pairs = ((i, j) for i in range(400) for j in range(400))
    while len(vocab) < size - 1:
        i, j = next(pairs)
        if max(i, j) < len(tokens) and tokens[i] + tokens[j] not in vocab:
            vocab[tokens[i] + tokens[j]] = len(tokens)
            tokens.append(tokens[i] + tokens[j])
            merges.append((tokens[i], tokens[j]))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(str(path))
    return path


def build_tiny(path: str | os.PathLike, *, instruct: bool = False, seed: int = 0,
               head_dim: int = TINY_HEAD_DIM) -> Path:
    """Write a tiny random OLMo 2 checkpoint to `path` and return it.

    The same seed gives the same weights; a different seed gives different ones.
    The directory appears whole or not at all (written beside it, then renamed), with a marker,
    `olmo2kit-tiny.json`, naming what was built and its files. Only what this function can tell
    it wrote is replaced: an empty directory, or one holding that marker and nothing but the files
    it names. Anything else at `path` is an Olmo2KitError, never deleted. `head_dim` widens the
    model (its four heads times `head_dim`): vLLM's CPU attention needs 32 or more (64 is the
    smallest that is also a power of two, as in OLMo 2's own 128).

    >>> build_tiny("/tmp/tiny-olmo2", instruct=True)  # doctest: +SKIP
    """
    path = Path(path).expanduser()
    _check_replaceable(path)
    make_output_dir(path.parent)
    if not 1 <= head_dim <= 512 or head_dim % 2:
        raise Olmo2KitError(f"--head-dim must be an even number from 2 to 512, not {head_dim}")
    tokenizer = build_tokenizer(instruct=instruct)
    model = _tiny_model(tokenizer, seed, head_dim)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as e:
        raise Olmo2KitError(
            f"cannot write in {path.parent} ({e.strerror}): give a directory you can write to"
        ) from None
    from safetensors import SafetensorError

    try:
        model.save_pretrained(staging)  # safetensors
        tokenizer.save_pretrained(staging)
        files = sorted(p.name for p in staging.iterdir())
        marker = {"built_by": "olmo2kit tiny", "instruct": instruct, "seed": seed, "head_dim": head_dim,
                  "files": files}
        (staging / MARKER).write_text(json.dumps(marker, indent=2))  # the directory is renamed in whole
        _check_replaceable(path)  # again: the directory may have changed while the model was built
        _swap_in(staging, path)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):
            raise cannot_write(path, e, "give a directory you can write to") from None
        if isinstance(e, SafetensorError):  # how safetensors reports a write that failed, a full disk among them
            raise Olmo2KitError(f"cannot write {path} ({e}): free some space, or give another directory") from None
        raise
    return path


def tiny_config(tokenizer, head_dim: int = TINY_HEAD_DIM):
    """The tiny architecture's transformers config, for `tokenizer` (from `build_tokenizer`), with heads of
    `head_dim` (the width follows: 4 heads of it)."""
    from olmo2kit.model.sizes import hf_config

    heads = TINY_ARCH["num_attention_heads"]
    width = dict(hidden_size=heads * head_dim, intermediate_size=2 * heads * head_dim)
    return hf_config(
        "1b",
        **{**TINY_ARCH, **width},
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def _tiny_model(tokenizer, seed: int, head_dim: int):
    import torch
    from transformers import GenerationConfig, Olmo2ForCausalLM

    torch.manual_seed(seed)
    model = Olmo2ForCausalLM(tiny_config(tokenizer, head_dim)).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return model


def _check_replaceable(path: Path) -> None:
    """Raise Olmo2KitError unless `path` is free, an empty directory, or a tiny checkpoint build_tiny wrote."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        raise Olmo2KitError(f"{path} exists and is not a checkpoint, so it is not replaced: give a new directory")
    present = sorted(p.name for p in path.iterdir())
    if not present:
        return
    ours = _marked_files(path)
    if ours is None:
        raise Olmo2KitError(
            f"{path} exists and is not a checkpoint, so it is not replaced: olmo2kit tiny replaces only a tiny "
            f"checkpoint it wrote (with its {MARKER}); give a new directory"
        )
    others = [name for name in present if name not in ours or not _plain_file(path / name)]
    if others:
        raise Olmo2KitError(
            f"{path} holds files that are not part of a tiny checkpoint ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}), so it is not replaced: give a new directory"
        )


def _marked_files(path: Path) -> set[str] | None:
    """The files a tiny checkpoint's marker names, marker included; None where there is no marker build_tiny wrote."""
    marker = path / MARKER
    if not _plain_file(marker):
        return None
    try:
        with marker.open("rb") as f:
            data = json.loads(f.read(1 << 16))  # a marker is small: a large file there is not one
    except (OSError, ValueError):
        return None
    if not (isinstance(data, dict) and data.get("built_by") == "olmo2kit tiny" and isinstance(data.get("files"), list)):
        return None
    files = data["files"]
    if not all(isinstance(name, str) and name and "/" not in name and name not in (".", "..") for name in files):
        return None
    return {*files, MARKER}


def _plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _swap_in(staging: Path, path: Path) -> None:
    """Rename `staging` to `path`; an old checkpoint there is moved aside first and removed last, so a crash
    at any point leaves it (or the new one) whole under some name."""
    if not path.exists():
        os.replace(staging, path)
        return
    old = staging.with_name(staging.name + ".old")
    os.replace(path, old)
    try:
        os.replace(staging, path)
    except BaseException:
        os.replace(old, path)  # the old one back where it was
        raise
    shutil.rmtree(old, ignore_errors=True)  # what is left of it is out of sight, and no one's data
