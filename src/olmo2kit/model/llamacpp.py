"""llama.cpp as the engine for CPU speed: an OLMo 2 checkpoint converted to GGUF and run by llama-cpp-python.

`engine="llamacpp"` takes any name `load` takes (size aliases, `repo@revision`, local or fine-tuned
directories): olmo2kit resolves and downloads it, converts it once to the GGUF type asked for
(`olmo2kit.model.gguf`: bf16 by default, or q8_0, q4_k_m, f16, f32) and hands llama.cpp the cached file.
The tokenizer and the chat template stay olmo2kit's (transformers'), so prompts become the same token ids
on every engine; llama.cpp turns them into new ones.

    >>> model, tokenizer = load_llamacpp("1b-instruct", gguf_type="q8_0")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import logging
import os
import weakref
from functools import cached_property
from pathlib import Path

from olmo2kit.devices import check_device
from olmo2kit.errors import Olmo2KitError
from olmo2kit.model.gguf import GGUF_TYPES, cached_gguf, check_gguf_type, checkpoint_dir
from olmo2kit.model.loading import ModelRef, load_tokenizer
from olmo2kit.model.sizes import context_length

log = logging.getLogger("olmo2kit")

# The GGUF type for each --dtype when --quantize names none: OLMo 2's own bf16 unless fp16 or fp32 is asked for.
GGUF_FOR_DTYPE = {"auto": "bf16", "bf16": "bf16", "bfloat16": "bf16", "fp16": "f16", "float16": "f16",
                  "fp32": "f32", "float32": "f32"}


def llamacpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def llamacpp_refusal(model: str, *, quantize: str | None, device: str) -> str | None:
    """Why llama.cpp cannot run this request as asked (one line), or None when it can. Reads no weights."""
    if not llamacpp_installed():
        return "llama.cpp's Python bindings are not installed: run `make llamacpp` (it builds llama-cpp-python)"
    if quantize and quantize not in GGUF_TYPES:
        return (f"llama.cpp takes a GGUF type for --quantize ({', '.join(GGUF_TYPES)}), not {quantize}: "
                "bitsandbytes runs on --engine transformers")
    check_device(device)
    if device not in ("auto", "cpu"):
        return f"olmo2kit runs llama.cpp on the CPU: use --device cpu (or auto), not --device {device}"
    return None  # a LoRA adapter directory is refused where the checkpoint is found (gguf.checkpoint_dir)


def gguf_type_for(dtype: str, quantize: str | None) -> str:
    """The GGUF type a request asks for: `quantize` when it names one, else the one for `dtype`."""
    if quantize:
        return check_gguf_type(quantize).name
    if dtype not in GGUF_FOR_DTYPE:
        raise Olmo2KitError(f"unknown dtype {dtype!r}: use auto, bf16, fp16 or fp32")
    return GGUF_FOR_DTYPE[dtype]


class LlamaCppModel:
    """An OLMo 2 checkpoint as llama.cpp runs it: the cached GGUF, the checkpoint's config, and llama.cpp's
    `Llama` over the file, started on first use.

    It answers what olmo2kit reads of a transformers model (`config`, `generation_config`, `name_or_path`,
    `dtype`, `device`), so the commands and the chat template work on it unchanged.
    """

    def __init__(self, gguf: Path, source: Path, ref: ModelRef, gguf_type: str, *, threads: int | None = None,
                 context: int | None = None) -> None:
        from transformers import AutoConfig, GenerationConfig

        self.gguf = gguf
        self.gguf_bytes = gguf.stat().st_size
        self.ref = ref
        self.name_or_path = str(ref)
        self.dtype = gguf_type
        self.device = "cpu"
        self.threads = threads or _usable_cores()
        self.config = AutoConfig.from_pretrained(source, trust_remote_code=False)
        try:
            self.generation_config = GenerationConfig.from_pretrained(source)
        except OSError:  # a checkpoint without generation_config.json: end of text from the config
            self.generation_config = GenerationConfig.from_model_config(self.config)
        model_context = context_length(self.config)
        self.context_length = min(x for x in (model_context, context) if x) if model_context or context else None

    @cached_property
    def llama(self):
        """llama.cpp's Llama over the GGUF (the weights are mapped here)."""
        from llama_cpp import Llama

        try:
            llama = Llama(model_path=str(self.gguf), n_ctx=self.context_length or 0, n_threads=self.threads,
                          n_threads_batch=self.threads, n_batch=512, seed=0, verbose=False,
                          **attention_options(self.dtype))
        except (ValueError, RuntimeError) as e:  # how llama-cpp-python reports a file llama.cpp cannot load
            raise Olmo2KitError(f"llama.cpp cannot load {self.gguf}: {e}") from None
        # Freed while the interpreter still runs: llama-cpp-python's own __del__ fails at exit.
        weakref.finalize(self, llama.close)
        return llama

    @cached_property
    def weights(self):
        """llama.cpp's model (its weights mapped from the GGUF) for `Decoder` contexts, loaded on first use."""
        import llama_cpp

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's load log, printed otherwise
        llama_cpp.llama_backend_init()
        weights = llama_cpp.llama_model_load_from_file(str(self.gguf).encode(), llama_cpp.llama_model_default_params())
        if not weights:
            raise Olmo2KitError(f"llama.cpp cannot load {self.gguf}")
        weakref.finalize(self, llama_cpp.llama_model_free, weights).atexit = False  # see Decoder
        return weights

    def close(self) -> None:
        llama = self.__dict__.pop("llama", None)
        if llama is not None:
            llama.close()


def load_llamacpp(model: str, *, revision: str | None = None, dtype: str = "auto", quantize: str | None = None,
                  device: str = "auto", threads: int | None = None, say=log.info, gguf_cache: Path | None = None):
    """`(LlamaCppModel, tokenizer)` for an OLMo 2 size alias, Hub repo (at a revision) or local directory, run
    from its GGUF in the type `quantize` names (else bf16, or f16/f32 for --dtype fp16/fp32), converted once
    into the GGUF cache (or `gguf_cache`)."""
    reason = llamacpp_refusal(model, quantize=quantize, device=device)
    if reason:
        raise Olmo2KitError(reason)
    gguf_type = gguf_type_for(dtype, quantize)
    ref, source = checkpoint_dir(model, revision)
    path = cached_gguf(ref, source, gguf_type, say=say, cache=gguf_cache)
    tokenizer = load_tokenizer(str(source))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LlamaCppModel(path, source, ref, gguf_type, threads=threads), tokenizer


def attention_options(gguf_type: str) -> dict:
    """llama.cpp's attention and key/value cache for a GGUF of `gguf_type` (keyword arguments of `Llama`).

    f32, which --dtype fp32 asks for, is run exactly: no flash attention, keys and values kept in f32, which
    gives transformers' fp32 logits to rounding; llama.cpp's flash attention on the CPU, and its default f16
    key/value cache, each round logits enough to flip near-ties in greedy decoding. Every other type runs for
    speed, with flash attention (llama-bench's default turns it on, llama-cpp-python's off; docs/benchmarks.md
    has both) and the f16 cache."""
    import llama_cpp

    if gguf_type == "f32":
        return {"flash_attn": False, "type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
    return {"flash_attn": True}


def _usable_cores() -> int:
    """The cores this process may run on (all of them where the OS does not say)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def llamacpp_version() -> str:
    import importlib.metadata as metadata

    return metadata.version("llama-cpp-python")


MAX_SEQUENCES = 256  # LLAMA_MAX_SEQ, src/llama-cparams.h of the vendored llama.cpp: a context holds no more


class Decoder:
    """One llama.cpp context over a model's weights, decoding several sequences in one batch: llama.cpp's
    batched decoding (`llama_decode` over a `llama_batch` whose tokens name their sequence), as its own server
    runs it. The key/value cache is one pool of `cells` positions shared by `sequences` sequences (llama.cpp's
    unified cache), so a long request and many short ones fit in the same memory.

    Tokens are queued with `add` (at most `batch_size` at a time), run with `decode`, which gives back the logits of
    the tokens that asked for them (rows in the order they were added); `forget` drops a sequence's positions from
    the cache.
    Used from one thread at a time.
    """

    def __init__(self, model: LlamaCppModel, *, cells: int, sequences: int, batch: int = 512) -> None:
        import llama_cpp

        if not 1 <= sequences <= MAX_SEQUENCES:
            raise Olmo2KitError(f"llama.cpp decodes 1 to {MAX_SEQUENCES} sequences together, not {sequences}: "
                                f"ask for at most {MAX_SEQUENCES} requests at once (--max-batch-size)")
        self._lib = llama_cpp
        self.cells, self.sequences, self.batch_size = cells, sequences, batch
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = cells, batch, batch
        params.n_seq_max, params.kv_unified = sequences, True
        params.n_threads = params.n_threads_batch = model.threads
        options = attention_options(model.dtype)
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if options["flash_attn"]
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        if "type_k" in options:
            params.type_k, params.type_v = options["type_k"], options["type_v"]
        self._ctx = llama_cpp.llama_init_from_model(model.weights, params)
        if not self._ctx:
            raise Olmo2KitError(f"llama.cpp could not make a context of {cells} positions for {model.gguf}: "
                                "ask for fewer")
        # Not run at exit: a scheduler's thread may still be inside llama_decode then (its close waits 10 s at
        # most), and the process's memory goes back to the OS anyway.
        self._free = weakref.finalize(self, llama_cpp.llama_free, self._ctx)
        self._free.atexit = False
        self._model = model  # the weights outlive the context
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model.weights))
        self._batch = llama_cpp.llama_batch_init(batch, 0, 1)
        weakref.finalize(self, llama_cpp.llama_batch_free, self._batch).atexit = False
        self._outputs = 0

    @property
    def queued(self) -> int:
        return self._batch.n_tokens

    def add(self, token: int, position: int, sequence: int, *, logits: bool) -> None:
        """Queue one token of `sequence` at `position` for the next `decode` (at most `batch_size` at a time)."""
        batch, i = self._batch, self._batch.n_tokens
        if i >= self.batch_size:  # past the batch llama_batch_init allocated: memory not ours
            raise Olmo2KitError(f"a llama.cpp batch holds {self.batch_size} tokens: decode before adding more")
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, position, 1
        batch.seq_id[i][0], batch.logits[i] = sequence, logits
        batch.n_tokens = i + 1
        self._outputs += bool(logits)

    def decode(self):
        """Run the queued tokens; a float32 array [outputs, vocab] of the logits asked for (a view of llama.cpp's
        buffer, valid until the next decode)."""
        import numpy as np

        outputs, self._outputs = self._outputs, 0
        try:
            code = self._lib.llama_decode(self._ctx, self._batch)
        finally:
            self._batch.n_tokens = 0
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")  # 1: no room in the cache; 2: aborted; < 0: error
        if not outputs:
            return np.empty((0, self.vocab), dtype=np.float32)
        return np.ctypeslib.as_array(self._lib.llama_get_logits(self._ctx), shape=(outputs * self.vocab,)).reshape(
            outputs, self.vocab)

    def clear(self) -> None:
        """Drop the queued tokens and every sequence's positions."""
        self._batch.n_tokens = self._outputs = 0
        self._lib.llama_memory_clear(self._memory, True)

    def forget(self, sequence: int, start: int = 0) -> None:
        """Drop the positions of `sequence` from `start` on."""
        self._lib.llama_memory_seq_rm(self._memory, sequence, start, -1)

    def close(self) -> None:
        self._free()
