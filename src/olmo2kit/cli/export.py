"""`olmo2kit export gguf` and `export ollama`: a checkpoint as a GGUF file for llama.cpp, ollama or LM Studio; and
`export olmo-core`: a checkpoint for OLMo's trainer (OLMo-core) to train on."""

from __future__ import annotations

from typing import Annotated

import typer

from olmo2kit.cli.options import RevisionOpt
from olmo2kit.cli.output import info

app = typer.Typer(help="Write a checkpoint as GGUF, for llama.cpp, LM Studio and ollama, or as an OLMo-core "
                       "checkpoint, for OLMo's trainer.", no_args_is_help=True,
                  context_settings={"help_option_names": ["-h", "--help"]})

_Model = Annotated[str, typer.Argument(help="Size alias (1b-instruct, ...), Hub repo id, repo@revision, or local "
                                            "directory (a fine-tune).")]


def _gguf_type(default: str):
    return Annotated[str, typer.Option("--quantize", "-q", help="GGUF type: q8_0, q4_k_m, bf16, f16 or f32 "
                                                               f"(default {default}).")]


@app.command("gguf")
def gguf(
    model: _Model,
    out: Annotated[str, typer.Argument(help="The .gguf file to write (a new one).")],
    quantize: _gguf_type("bf16") = "bf16",
    revision: RevisionOpt = None,
) -> None:
    """Convert a checkpoint to one GGUF file with llama.cpp's own converter (tokenizer, special tokens and chat
    template included).

    Examples:

      olmo2kit export gguf 1b-instruct olmo2-1b-instruct-q8_0.gguf --quantize q8_0

      olmo2kit export gguf 7b olmo2-7b-step140k.gguf --revision stage1-step140000-tokens294B

      olmo2kit export gguf ./my-finetune my-finetune.gguf
    """
    import time

    from olmo2kit.compat import quiet_transformers
    from olmo2kit.model.gguf import export_gguf

    quiet_transformers()
    start = time.perf_counter()
    written = export_gguf(model, out, revision=revision, gguf_type=quantize, say=info)
    info(f"wrote {written} ({written.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - start:.1f} s")
    print(written)


@app.command("ollama")
def ollama(
    model: _Model,
    directory: Annotated[str, typer.Argument(help="Directory to write the GGUF and its Modelfile to.")],
    quantize: _gguf_type("q4_k_m") = "q4_k_m",
    revision: RevisionOpt = None,
) -> None:
    """Write a GGUF and an ollama Modelfile (the OLMo 2 chat template, its stop tokens, the model card's
    sampling defaults), then import it with `ollama create NAME -f DIRECTORY/Modelfile`.

    Examples:

      olmo2kit export ollama 1b-instruct ./olmo2-1b && ollama create olmo2-1b -f ./olmo2-1b/Modelfile
    """
    from olmo2kit.compat import quiet_transformers
    from olmo2kit.inference.sampling import DEFAULTS
    from olmo2kit.model.gguf import export_ollama

    quiet_transformers()
    parameters = {"temperature": DEFAULTS.temperature, "top_k": DEFAULTS.top_k, "top_p": DEFAULTS.top_p}
    written = export_ollama(model, directory, revision=revision, gguf_type=quantize, parameters=parameters, say=info)
    info(f"import it with: ollama create NAME -f {written / 'Modelfile'}")
    print(written)


@app.command("olmo-core")
def olmo_core(
    model: Annotated[str, typer.Argument(help="Size alias (1b, ...), Hub repo id, repo@revision, local directory (a "
                                              "fine-tune), or a LoRA adapter directory (merged into its base).")],
    out: Annotated[str, typer.Argument(help="The directory to write (a new or empty one).")],
    revision: RevisionOpt = None,
) -> None:
    """Convert a checkpoint to an OLMo-core checkpoint that OLMo's trainer loads to train on: the model as a torch
    distributed checkpoint in OUT/model_and_optim, its TransformerConfig in OUT/config.json. OLMo-core's model is
    checked against transformers' on a probe batch first (the largest logit difference is said), and each tensor
    against its source; nothing is written where they differ, or where writing in the checkpoint's dtype (that of
    the revision loaded) would change a weight. Needs OLMo-core (`make olmo-core`).

    Examples:

      olmo2kit export olmo-core 1b ./olmo2-1b-olmo-core

      olmo2kit export olmo-core 1b@stage1-step140000-tokens294B ./1b-step140k-olmo-core

      olmo2kit export olmo-core ./my-lora-adapter ./my-finetune-olmo-core

    Then train on it with OLMo-core: torchrun ... SCRIPT.py --save-folder=RUN --load_path=OUT/model_and_optim
    """
    import time

    from olmo2kit.compat import quiet_transformers
    from olmo2kit.model.olmo_core import export_olmo_core

    quiet_transformers()
    start = time.perf_counter()
    done = export_olmo_core(model, out, revision=revision, say=info)
    say_conversion(done, "OLMo-core's model gives transformers'", time.perf_counter() - start)


def say_conversion(done, agreement: str, seconds: float) -> None:
    """What an OLMo-core conversion checked and wrote (stderr), then the path it wrote (stdout)."""
    info(f"{agreement} logits on the probe batch (largest difference {done.max_logit_diff:.3g}); wrote "
         f"{done.tensors} tensors ({done.parameters:,} parameters, {done.dtype}) in {seconds:.1f} s")
    print(done.path)
