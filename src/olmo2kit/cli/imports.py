"""`olmo2kit import olmo-core`: a checkpoint OLMo's trainer (OLMo-core) wrote, as a Hugging Face checkpoint that
every olmo2kit command, vLLM and llama.cpp load."""

from __future__ import annotations

from typing import Annotated

import typer

from olmo2kit.cli.export import say_conversion
from olmo2kit.cli.output import info

app = typer.Typer(help="Bring a checkpoint from OLMo's trainer (OLMo-core) back as a Hugging Face checkpoint.",
                  no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]})


@app.command("olmo-core")
def olmo_core(
    checkpoint: Annotated[str, typer.Argument(help="A step directory OLMo-core's trainer wrote (RUN/step1000, or "
                                                   "RUN/step1000/model_and_optim), sharded by any number of ranks.")],
    out: Annotated[str, typer.Argument(help="The directory to write (a new or empty one).")],
    tokenizer: Annotated[str | None, typer.Option(
        "--tokenizer", help="The tokenizer to write with it (a Hub repo or a checkpoint directory); by default the "
                            "one `export olmo-core` left beside it, else the one the run's config.json names.")] = None,
) -> None:
    """Convert an OLMo-core checkpoint (any step) to a Hugging Face checkpoint: safetensors, config.json (with
    the context length) and the tokenizer. transformers' model is checked against OLMo-core's on a probe batch
    first (the largest logit difference is said); nothing is written where they differ, or where the tokenizer does
    not fit the model. The checkpoint's pickled files are read with only the classes a checkpoint holds, and its
    config.json's class names (`_CLASS_`) must be OLMo-core's config classes, so it cannot run code. Needs OLMo-core
    (`make olmo-core`).

    Examples:

      olmo2kit import olmo-core ./run/step1000 ./olmo2-1b-step1000

      olmo2kit import olmo-core ./run/step1000 ./olmo2-1b-step1000 --tokenizer allenai/OLMo-2-0425-1B

    Then: olmo2kit generate --model ./olmo2-1b-step1000 "Language modeling is "
    """
    import time

    from olmo2kit.compat import quiet_transformers
    from olmo2kit.model.olmo_core import import_olmo_core

    quiet_transformers()
    start = time.perf_counter()
    done = import_olmo_core(checkpoint, out, tokenizer=tokenizer, say=info)
    say_conversion(done, "transformers' model gives OLMo-core's", time.perf_counter() - start)
