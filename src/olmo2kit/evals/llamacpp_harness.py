"""lm-evaluation-harness's model interface over olmo2kit's llama.cpp engine, which `evaluate_tasks` hands a model
llama.cpp runs (lm-eval's own llama.cpp class, `gguf`, needs a llama.cpp server and scores only the tokens that
server returns).

Log-likelihoods come from `LlamaCppEngine.scored` (llama.cpp's float32 logits), text from the engine's `tokens`
through olmo2kit's `Detokenizer`. Requests are encoded, cut to the context and answered as lm-eval's HFLM answers
them (lm_eval/models/huggingface.py: `tok_encode`, `_loglikelihood_tokens`, `loglikelihood_rolling`,
`generate_until`), so that a task scores the same on llama.cpp as on transformers.

Imported only when a task runs on llama.cpp: lm-eval is an optional extra.
"""

from __future__ import annotations

import time

from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from olmo2kit.errors import Olmo2KitError
from olmo2kit.inference.engines import LlamaCppEngine
from olmo2kit.inference.generation import Detokenizer
from olmo2kit.inference.sampling import SamplingOptions
from olmo2kit.model.sizes import CONTEXT_LENGTH

# Tokens generate_until makes when a task gives no max_gen_toks: HFLM's `max_gen_toks`.
MAX_GEN_TOKS = 256


class LlamaCppLM(TemplateLM):
    """lm-eval's `TemplateLM` over a `LlamaCppEngine`: `loglikelihood` (from TemplateLM, which encodes the pairs),
    `loglikelihood_rolling` and `generate_until`."""

    def __init__(self, engine: LlamaCppEngine) -> None:
        super().__init__()
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_length = engine.scoring_context or CONTEXT_LENGTH

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            options["add_special_tokens"] = False  # the text brings its own beginning-of-text token
        return self.tokenizer.encode(string, **options)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        windows = []
        for _, context, continuation in requests:
            if not context or not continuation or len(continuation) > self.max_length:
                raise Olmo2KitError(f"lm-eval asked to score {len(continuation)} tokens after {len(context)}: "
                                    f"it takes 1 to {self.max_length} after at least one")
            # Cut from the left to the context, as HFLM does: the last token is scored but never read.
            whole = (context + continuation)[-(self.max_length + 1):]
            windows.append((whole, len(whole) - len(continuation)))
        answers = [(-nll, greedy) for nll, greedy in self.engine.scored(windows)]
        for (pair, _, _), answer in zip(requests, answers, strict=True):
            if pair is not None:  # loglikelihood_rolling's windows are cached per request, below
                self.cache_hook.add_partial("loglikelihood", pair, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for index, (string,) in enumerate(request.args for request in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for index, (loglikelihood, _) in zip(owners, self._loglikelihood_tokens(windows), strict=True):
            totals[index] += loglikelihood
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tokenizer.decode(self.eot_token_id)
        eos_ids = self.engine.eos_ids()
        texts = []
        for context, gen_kwargs in (request.args for request in requests):
            options = normalize_gen_kwargs(gen_kwargs, MAX_GEN_TOKS)
            until = handle_stop_sequences(options.pop("until", None), eos=eos)
            new_tokens = options.pop("max_gen_toks")
            if new_tokens >= self.max_length:
                raise Olmo2KitError(f"the task asks for {new_tokens} new tokens, and the model's context holds "
                                    f"{self.max_length} in all: give the task a smaller max_gen_toks")
            sampling = SamplingOptions.from_options({**options, "max_new_tokens": new_tokens})
            # The prompt cut from the left to leave room for the new tokens, as HFLM does; an empty one starts
            # from the beginning-of-text token, as an empty context does in `loglikelihood`.
            ids = self.tok_encode(context)[-(self.max_length - new_tokens):] or [self.prefix_token_id]
            text = self._generate(ids, sampling, until, eos_ids)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            texts.append(text)
        return texts

    def _generate(self, ids: list[int], sampling: SamplingOptions, until: list[str], eos_ids: set[int]) -> str:
        """The text the engine continues `ids` with, cut at end of text or the first of `until`."""
        detokenizer = Detokenizer(self.tokenizer, until, eos_ids, len(ids), time.perf_counter(), stream=False)
        chunks = []
        steps = self.engine.tokens([ids], sampling, eos_ids, stream=True)
        try:
            for step in steps:
                chunks += detokenizer.add(step[0])
                if detokenizer.finished:
                    break
        finally:
            steps.close()
        chunks += detokenizer.finish()
        return "".join(chunk.text for chunk in chunks)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)
