"""`olmo2kit chat`: a conversation with an instruct model, from a terminal or piped input."""

from __future__ import annotations

import signal
import sys
from typing import Annotated

import typer

from olmo2kit.cli.common import keep_sampling_on_transformers, load_model, sampling_options, vllm_options
from olmo2kit.cli.options import (
    CompileOpt,
    DataParallelOpt,
    DeviceOpt,
    DtypeOpt,
    EnforceEagerOpt,
    EngineOpt,
    GpuMemoryOpt,
    GreedyOpt,
    MaxModelLenOpt,
    MaxNewTokensOpt,
    MinPOpt,
    ModelOpt,
    PipelineParallelOpt,
    QuantizeOpt,
    RepetitionPenaltyOpt,
    RevisionOpt,
    SeedOpt,
    TemperatureOpt,
    TensorParallelOpt,
    TopKOpt,
    TopPOpt,
)
from olmo2kit.cli.output import info
from olmo2kit.errors import Olmo2KitError
from olmo2kit.inference.sampling import DEFAULTS
from olmo2kit.model.sizes import check_context

CHAT_HELP = """\
  /help            this list
  /undo            drop your last message and its reply
  /retry           drop the last reply and generate it again
  /reset           forget the conversation (the system message stays)
  /system TEXT     set the system message; /system alone removes it
  /set KEY=VALUE   temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens, seed, greedy;
                   /set alone shows them
  /save FILE       write the transcript as JSON
  /load FILE       continue a transcript written by /save (it replaces this conversation)
  /exit            leave (Ctrl-D too); Ctrl-C stops a reply
  When the conversation outgrows the model's context, its oldest turns are dropped, with a warning."""

_SET_PARSERS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "repetition_penalty": float,
                "max_new_tokens": int, "seed": int}


def chat(
    model: ModelOpt = "1b-instruct",
    revision: RevisionOpt = None,
    system: Annotated[
        str | None, typer.Option("--system", help="System message, kept at the start of the conversation.")
    ] = None,
    quantize: QuantizeOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    max_new_tokens: MaxNewTokensOpt = DEFAULTS.max_new_tokens,
    temperature: TemperatureOpt = DEFAULTS.temperature,
    top_k: TopKOpt = DEFAULTS.top_k,
    top_p: TopPOpt = DEFAULTS.top_p,
    greedy: GreedyOpt = False,
    seed: SeedOpt = None,
    min_p: MinPOpt = DEFAULTS.min_p,
    repetition_penalty: RepetitionPenaltyOpt = DEFAULTS.repetition_penalty,
    compile: CompileOpt = False,
    engine: EngineOpt = "auto",
    tensor_parallel_size: TensorParallelOpt = 1,
    pipeline_parallel_size: PipelineParallelOpt = 1,
    data_parallel_size: DataParallelOpt = 1,
    gpu_memory_utilization: GpuMemoryOpt = 0.9,
    max_model_len: MaxModelLenOpt = None,
    enforce_eager: EnforceEagerOpt = False,
) -> None:
    """Chat with an instruct model: replies stream to stdout, the conversation is kept.

    One message a line from stdin, on a terminal or piped; a line that is not text is skipped with an error.
    Commands: /help, /undo, /retry, /reset, /system TEXT, /set KEY=VALUE, /save FILE, /load FILE, /exit.
    Ctrl-D (or the end of piped input) leaves; Ctrl-C stops a reply.
    A base model (no chat template) gets the official OLMo 2 one, with a warning.

    Examples:

      olmo2kit chat

      olmo2kit chat -m 7b-instruct -q nf4 --system "Answer in one sentence."

      printf 'Hi!\\n/save chat.json\\n' | olmo2kit chat --model ./tiny-chat --greedy

      olmo2kit chat -m 13b-instruct --engine vllm --tensor-parallel-size 2
    """
    if sys.stdin is None:  # started with its standard input closed
        raise Olmo2KitError("the chat reads its messages from stdin, and there is none: run it on a terminal or pipe")
    options = sampling_options(max_new_tokens, temperature, top_k, top_p, greedy, seed, min_p=min_p,
                               repetition_penalty=repetition_penalty)
    vllm = vllm_options(tensor_parallel_size, pipeline_parallel_size, data_parallel_size, gpu_memory_utilization,
                        max_model_len, enforce_eager, engine)
    loaded, tokenizer = load_model(model, revision, dtype, quantize, device, engine=engine, vllm=vllm,
                                   unsupported="--compile" if compile else None, cpu_llamacpp=True,
                                   keep_transformers=keep_sampling_on_transformers(options))
    from olmo2kit.inference.chat import ChatSession
    from olmo2kit.model.chat_template import chat_template
    from olmo2kit.model.loading import resolve_model
    from olmo2kit.model.sizes import context_length

    # a conversation is at least one token: the room for a reply is checked before the first message
    check_context(1, max_new_tokens, context_length(loaded.config), prompt="the conversation", new="--max-new-tokens")

    chat_template(tokenizer)  # the warning for a model without one, before the first message
    name = str(resolve_model(model, revision))
    session = ChatSession(loaded, tokenizer, system=system, compile=compile, **options)
    info(f"chatting with {name}: /help for commands, Ctrl-D to leave")
    _converse(session, name)


def _converse(session, name: str) -> None:
    """Read lines until the input ends or /exit: a message gets a streamed reply, a /command runs. An error
    in one line is one line on stderr, and the session goes on with its conversation and options; the model
    failing (ModelFailed: it cannot load, say) ends the chat, as an Olmo2KitError, with the lines after unread."""
    from olmo2kit.inference.chat import ModelFailed

    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # not on every platform; input() works without it
            pass
    while True:
        try:
            line = _read_line(interactive)
        except KeyboardInterrupt:
            info("\n(Ctrl-D or /exit leaves)")
            continue
        except UnicodeDecodeError as e:  # one line that is not text: the conversation goes on
            info(f"error: that line is not {e.encoding} text: skipped")
            continue
        if line is None:
            return
        if not line:
            continue
        try:
            if line.startswith("/"):
                if _chat_command(session, line, name):
                    return
            else:
                _stream_reply(session.send(line))
        except ModelFailed:  # every later turn would fail the same way
            raise
        except Olmo2KitError as e:
            info(f"error: {e}")


def _read_line(interactive: bool) -> str | None:
    """The next line of input, stripped; None at its end. A line that does not decode raises
    UnicodeDecodeError, and the next one reads as usual; stdin that cannot be read is an Olmo2KitError."""
    if interactive:
        sys.stderr.write(">>> ")
        sys.stderr.flush()
    try:
        if interactive or not hasattr(sys.stdin, "buffer"):
            line = input()
        else:  # byte lines, decoded one by one: a bad line costs that line, not the rest of the read buffer
            raw = sys.stdin.buffer.readline()
            if not raw:
                raise EOFError
            line = raw.decode(sys.stdin.encoding or "utf-8")
    except EOFError:
        if interactive:
            sys.stderr.write("\n")
        return None
    except OSError as e:
        raise Olmo2KitError(f"cannot read the chat's input ({e.strerror or e})") from None
    return line.strip()


def _stream_reply(stream) -> None:
    """Stream a reply (`session.send` or `session.retry`) to stdout. Ctrl-C stops it; the conversation
    keeps what was shown.

    The session keeps every chunk it yielded, so Ctrl-C is acted on between chunks, once the last one is
    on the screen: an interrupt that landed between the yield and the write would otherwise keep text that
    was never shown. A second Ctrl-C stops at once (a reply that yields nothing for a long time).
    """
    last = None
    stopping = False

    def on_sigint(signum, frame):
        nonlocal stopping
        if stopping:
            raise KeyboardInterrupt
        stopping = True

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        for last in stream:
            sys.stdout.write(last.text)
            sys.stdout.flush()
            if stopping:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        stream.close()
        if last is not None:
            sys.stdout.write("\n")
            sys.stdout.flush()
        info("[stopped]")
        return
    except Olmo2KitError:
        if last is not None:  # the error goes on a line of its own
            sys.stdout.write("\n")
            sys.stdout.flush()
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if last is not None and last.finish_reason == "length":
        info(f"[cut at {last.new_tokens} tokens: /set max_new_tokens=N for longer replies]")


def _chat_command(session, line: str, name: str) -> bool:
    """Run one /command; True means leave."""
    command, _, argument = line.partition(" ")
    argument = argument.strip()
    if command in ("/exit", "/quit"):
        return True
    if command == "/help":
        info(CHAT_HELP)
    elif command == "/undo":
        dropped = session.undo()
        info(f"dropped your last message{' and its reply' if len(dropped) > 1 else ''}")
    elif command == "/retry":
        _stream_reply(session.retry())
    elif command == "/reset":
        session.reset()
        info("conversation cleared")
    elif command == "/system":
        session.set_system(argument)
        info("system message set" if argument else "system message removed")
    elif command == "/set":
        _chat_set(session, argument)
    elif command == "/save":
        if not argument:
            raise Olmo2KitError("/save needs a file name, e.g. /save chat.json")
        path = session.save(argument, name)
        info(f"saved {len(session.messages)} messages to {path}")
    elif command == "/load":
        if not argument:
            raise Olmo2KitError("/load needs a file name, e.g. /load chat.json")
        saved_with = session.load(argument)
        other = f" (saved with {saved_with})" if saved_with and saved_with != name else ""
        info(f"loaded {len(session.messages)} messages from {argument}{other}")
    else:
        raise Olmo2KitError(f"unknown command {command}: /help lists them")
    return False


def _chat_set(session, argument: str) -> None:
    """`/set temperature=0.7 top_k=20`, or `/set` alone to show the options."""
    if not argument:
        s = session.sampling
        seed = "none" if s.seed is None else s.seed
        info(f"max_new_tokens={s.max_new_tokens} temperature={s.temperature} top_k={s.top_k} top_p={s.top_p} "
             f"min_p={s.min_p} repetition_penalty={s.repetition_penalty} seed={seed} "
             f"greedy={'on' if not s.do_sample else 'off'}")
        return
    changes: dict = {}
    for pair in argument.split():
        key, eq, value = pair.partition("=")
        if not eq or not value:
            raise Olmo2KitError(f"/set takes KEY=VALUE, got {pair!r}")
        if key == "greedy":
            if value.lower() not in ("on", "off", "true", "false", "1", "0"):
                raise Olmo2KitError(f"greedy is on or off, got {value!r}")
            changes["do_sample"] = value.lower() in ("off", "false", "0")
        elif key == "seed" and value.lower() == "none":
            changes["seed"] = None
        elif key in _SET_PARSERS:
            try:
                changes[key] = _SET_PARSERS[key](value)
            except ValueError:
                raise Olmo2KitError(f"{key} takes a number, got {value!r}") from None
        else:
            raise Olmo2KitError(f"cannot set {key!r}: use {', '.join([*_SET_PARSERS, 'greedy'])}")
    session.set_options(**changes)
    info("set " + argument)
