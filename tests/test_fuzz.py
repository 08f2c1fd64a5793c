"""Fuzzing every command that reads files or stdin: random bytes, random JSON and random option values.

Whatever comes in, a command exits 0 or 2, prints no traceback, and changes no file but its own outputs.
Each command runs in this process on the tiny checkpoints; OLMO2KIT_FUZZ_EXAMPLES sets the examples per
command (default 30), and the tests add up how many inputs they tried in FUZZ_COUNT.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("OLMO2KIT_FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FUZZ_COUNT: Counter = Counter()
FUZZ_OK: Counter = Counter()  # inputs a command took and ran to the end (exit 0)
CWD = Path()  # where the commands run: set to the fuzz folder, so a file they write anywhere shows

# Values that have broken parsers before: huge, negative, non-finite, empty, wrong type, invalid text.
WEIRD_NUMBERS = st.sampled_from([0, -1, 1, 2**31, 2**32, 2**63, 10**30, -(10**30), 0.5, -0.5, 1e-30, 1e30,
                                 float("nan"), float("inf"), -float("inf")])
WEIRD_TEXT = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "\x00", "\ud800", "-", "/dev/zero", "..",
                                                              "{}", "[]", "null", "é" * 100]))
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), WEIRD_NUMBERS.filter(lambda v: v == v and abs(v) != float("inf")),
              st.integers(), WEIRD_TEXT),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children,
                                                                                max_size=4)),
    max_leaves=12,
)
KEYS = ["id", "prompt", "messages", "text", "role", "content", "max_new_tokens", "max_tokens", "temperature",
        "top_k", "top_p", "seed", "stop", "do_sample", "metadata", "temprature"]
RECORDS = st.one_of(
    st.dictionaries(st.sampled_from(KEYS), JSON_VALUES, max_size=5),
    st.fixed_dictionaries({"prompt": WEIRD_TEXT}, optional={k: JSON_VALUES for k in KEYS[4:]}),
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "bot", ""]), "content": JSON_VALUES}), max_size=3)}),
    st.fixed_dictionaries({"text": JSON_VALUES}),
    JSON_VALUES,
)
LINES = st.lists(st.one_of(RECORDS.map(lambda r: json.dumps(r).encode()), st.binary(max_size=60)), max_size=5)


def jsonl(lines: list[bytes]) -> bytes:
    return b"\n".join(lines) + b"\n"


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` and its content hash (a device or fifo by its kind)."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def run(*args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    """The CLI in this process, stdin as raw bytes (decoded as the real stdin is: UTF-8, strict)."""
    from olmo2kit.cli import app

    out, err = io.StringIO(), io.StringIO()
    real_stdin = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    argv, sys.argv = sys.argv, ["olmo2kit", *args]
    cwd = os.getcwd()
    os.chdir(CWD)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                app.main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.stdin, sys.argv = real_stdin, argv
        os.chdir(cwd)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module", autouse=True)
def report_count():
    """How many inputs the tests of this file tried, on stdout at the end (pytest -s shows it)."""
    yield
    total = sum(FUZZ_COUNT.values())
    print(f"\nfuzz inputs tried: {total} ({', '.join(f'{k} {v}' for k, v in sorted(FUZZ_COUNT.items()))})")


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_path, tiny_instruct_path) -> Path:
    """A folder the commands run against: its files must not change except the outputs each test names."""
    import shutil

    root = tmp_path_factory.mktemp("fuzz")
    (root / "inputs").mkdir()
    shutil.copytree(tiny_path, root / "tiny")  # inside the folder, so that a change to a checkpoint shows too
    shutil.copytree(tiny_instruct_path, root / "tiny-instruct")
    global CWD
    CWD = root
    return root


def check(command: str, result: tuple[int, str, str]) -> None:
    """Exit 0, or 2 with an `error:` line (or click's usage error, for a value of the wrong type); never a
    traceback."""
    code, _, err = result
    FUZZ_COUNT[command] += 1
    FUZZ_OK[command] += code == 0
    assert code in (0, 2), f"{command}: exit {code}\n{err[-2000:]}"
    assert "Traceback" not in err, f"{command}:\n{err[-3000:]}"
    if code == 2:
        usage_error = err.startswith("Usage: ") and "Invalid value" in err
        assert usage_error or [line for line in err.splitlines() if line.startswith("error: ")], err[-2000:]


@contextlib.contextmanager
def unchanged(work: Path, *outputs: Path):
    """The files under `work`, less `outputs` (files or folders), are the same after the block."""
    def kept(found: dict[str, str]) -> dict[str, str]:
        names = [str(p.relative_to(work)) for p in outputs]
        return {k: v for k, v in found.items() if not any(k == n or k.startswith(n + os.sep) for n in names)}

    before = kept(snapshot(work))
    yield
    assert kept(snapshot(work)) == before


@FUZZ
@given(data=st.binary(max_size=200))
def test_generate_reads_any_stdin(work, data):
    with unchanged(work):
        check("generate -", run("generate", "-", "--model", str(work / "tiny"), "-n", "2", "--greedy", stdin=data))


def mostly(*valid):
    """A valid value most of the time, a weird one now and then: inputs must get past the first check."""
    return st.one_of(st.sampled_from(valid), st.sampled_from(valid), st.sampled_from(valid), WEIRD_NUMBERS)


@settings(FUZZ, max_examples=3 * EXAMPLES)  # five options at once: more tries for each weird value to meet valid ones
@given(temperature=mostly(0.7, 1.0, 1.5), top_k=mostly(0, 1, 50), top_p=mostly(0.5, 0.95, 1.0),
       seed=mostly(0, 7, 2**32 - 1), new=mostly(1, 3, 5),
       prompt=st.one_of(st.just("Hello"), st.just("Hello"), st.just("Hello"), WEIRD_TEXT))
def test_generate_takes_any_option_values(work, temperature, top_k, top_p, seed, new, prompt):
    args = ["generate", prompt or "x", "--model", str(work / "tiny"), "--temperature", str(temperature),
            "--top-k", str(top_k), "--top-p", str(top_p), "--seed", str(seed), "-n", str(new)]
    with unchanged(work):
        result = run(*args)
    check("generate options", result)


@FUZZ
@given(lines=LINES, chat=st.booleans())
def test_batch_jobs_read_any_jsonl(work, lines, chat):
    source, out = work / "inputs" / "job.jsonl", work / "job-out.jsonl"
    source.write_bytes(jsonl(lines))
    out.unlink(missing_ok=True)
    args = ["generate", "--input", str(source), "--output", str(out), "--model", str(work / "tiny"), "-n", "2",
            "--greedy"]
    with unchanged(work, out, work / f".{out.name}.lock"):
        check("generate --input", run(*args, *(["--chat"] if chat else [])))
    # split on newlines only: a result may hold U+0085 or U+2028, which str.splitlines takes for line ends
    assert not out.exists() or all(json.loads(line)["id"] is not None for line in out.read_text().split("\n")[:-1])


@FUZZ
@given(data=st.binary(max_size=300), from_stdin=st.booleans())
def test_perplexity_reads_any_text(work, data, from_stdin):
    text = work / "inputs" / "text.txt"
    text.write_bytes(data)
    args = ["perplexity", "-" if from_stdin else str(text), "--model", str(work / "tiny"), "--max-length", "64"]
    with unchanged(work):
        check("perplexity", run(*args, stdin=data if from_stdin else b""))


CHAT_LINES = st.lists(st.one_of(
    st.binary(max_size=30),
    st.builds(lambda key, value: f"/set {key}={value}".encode("utf-8", "surrogatepass"),
              st.sampled_from(["temperature", "top_k", "top_p", "seed", "max_new_tokens", "greedy", "x"]),
              st.one_of(WEIRD_NUMBERS.map(str), WEIRD_TEXT)),
    st.sampled_from([b"/reset", b"/system", b"/system Be brief.", b"/help", b"/unknown", b"/save", b"Hi"]),
), max_size=5)


@FUZZ
@given(lines=CHAT_LINES)
def test_chat_reads_any_stdin(work, lines):
    with unchanged(work):
        check("chat", run("chat", "--model", str(work / "tiny-instruct"), "-n", "2", "--greedy",
                                stdin=b"\n".join(lines) + b"\n"))


MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot", ""]),
                                 "content": st.one_of(WEIRD_TEXT, JSON_VALUES)})
# Preference pairs: mostly a shared prompt and two answers (valid or nearly), sometimes anything under the two keys.
PAIRS = st.one_of(
    st.builds(lambda prompt, good, bad: {"chosen": [*prompt, good], "rejected": [*prompt, bad]},
              st.lists(MESSAGE, max_size=2), MESSAGE, MESSAGE),
    st.builds(lambda prompt, good, bad: {"chosen": [*prompt, good], "rejected": [*prompt, bad]},
              st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": st.text(max_size=20)}), max_size=2),
              st.fixed_dictionaries({"role": st.just("assistant"), "content": st.text(min_size=1, max_size=20)}),
              st.fixed_dictionaries({"role": st.just("assistant"), "content": st.text(min_size=1, max_size=20)})),
    st.fixed_dictionaries({"chosen": JSON_VALUES, "rejected": JSON_VALUES}),
)
PREPARE_LINES = st.lists(st.one_of(st.one_of(RECORDS, PAIRS).map(lambda r: json.dumps(r).encode()),
                                   st.binary(max_size=60)), max_size=5)


@FUZZ
@given(lines=PREPARE_LINES, data_format=st.sampled_from([None, "chat", "text", "preference"]))
def test_prepare_data_reads_any_jsonl(work, lines, data_format):
    source, outdir = work / "inputs" / "train.jsonl", work / "prepared"
    source.write_bytes(jsonl(lines))
    args = ["prepare-data", str(source), str(outdir), "--model", str(work / "tiny-instruct"), "--seq-len", "32"]
    with unchanged(work, outdir):
        check("prepare-data", run(*args, *(["--format", data_format] if data_format else [])))


FINETUNE_KEYS = ["lr", "epochs", "max_steps", "batch_size", "grad_accum", "seq_len", "lora", "lora_r", "warmup",
                 "quantize", "device", "seed", "unknown_key", "save_every"]


@FUZZ
@given(config=st.one_of(st.binary(max_size=80),
                        st.dictionaries(st.sampled_from(FINETUNE_KEYS), JSON_VALUES, max_size=3).map(
                            lambda d: json.dumps(d).encode())))
def test_finetune_reads_any_config(work, config):
    data = work / "ft-data"
    if not (data / "manifest.json").exists():
        source = work / "inputs" / "ft.jsonl"
        source.write_text(json.dumps({"text": "Language modeling is the task of predicting the next word."}) + "\n")
        run("prepare-data", str(source), str(data), "--model", str(work / "tiny"), "--seq-len", "32")
    recipe, out = work / "inputs" / "recipe.yaml", work / "ft-out"
    recipe.write_bytes(config)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    args = ["finetune", "--config", str(recipe), "--data", str(data), "--output", str(out), "--model",
            str(work / "tiny"), "--max-steps", "1", "--device", "cpu"]
    with unchanged(work, out):
        check("finetune", run(*args))


DPO_KEYS = [*FINETUNE_KEYS, "method", "beta", "dpo_loss", "lora_dropout", "val_fraction"]


@FUZZ
@given(config=st.dictionaries(st.sampled_from(DPO_KEYS), st.one_of(
    JSON_VALUES, st.sampled_from(["sft", "dpo", "sigmoid", "length-normalized"]), WEIRD_NUMBERS), max_size=3),
    on_sft_data=st.booleans())
def test_finetune_dpo_reads_any_config(work, config, on_sft_data):
    """finetune --method dpo, on preference data or on SFT data, with a random recipe (beta, dpo_loss, method...)."""
    import shutil

    data = work / "dpo-data"
    if not (data / "manifest.json").exists():
        source = work / "inputs" / "pairs.jsonl"
        user = {"role": "user", "content": "Say hello."}
        source.write_text("".join(json.dumps({"chosen": [user, {"role": "assistant", "content": good}],
                                              "rejected": [user, {"role": "assistant", "content": bad}]}) + "\n"
                                  for good, bad in [("Hello!", "No."), ("Hi there.", "Go away.")]))
        run("prepare-data", str(source), str(data), "--model", str(work / "tiny-instruct"), "--seq-len", "32")
    if on_sft_data and not (work / "ft-data" / "manifest.json").exists():
        source = work / "inputs" / "ft.jsonl"
        source.write_text(json.dumps({"text": "Language modeling is the task of predicting the next word."}) + "\n")
        run("prepare-data", str(source), str(work / "ft-data"), "--model", str(work / "tiny"), "--seq-len", "32")
    recipe, out = work / "inputs" / "recipe.yaml", work / "dpo-out"
    recipe.write_text(json.dumps(config))
    shutil.rmtree(out, ignore_errors=True)
    args = ["finetune", "--method", "dpo", "--config", str(recipe), "--data",
            str(work / "ft-data" if on_sft_data else data), "--output", str(out), "--model",
            str(work / "tiny-instruct"), "--max-steps", "1", "--device", "cpu"]
    with unchanged(work, out, data / "reference"):  # the reference log-probabilities are stored with the data
        check("finetune --method dpo", run(*args))


@FUZZ
@given(from_end=st.one_of(st.integers(1, 8), st.integers(1, 1 << 16)), junk=st.binary(min_size=1, max_size=16))
def test_finetune_dpo_never_uses_a_damaged_stored_reference(work, from_end, junk):
    """Some bytes of the stored reference log-probabilities overwritten: the run computes them again (its first
    loss is ln 2, the policy being the reference) or stops in one line; it never trains against the damage."""
    import math
    import shutil

    data, out = work / "dpo-ref-data", work / "dpo-ref-out"
    args = ["finetune", "--method", "dpo", "--data", str(data), "--output", str(out), "--model",
            str(work / "tiny-instruct"), "--max-steps", "1", "--device", "cpu"]
    if not (data / "manifest.json").exists():
        source = work / "inputs" / "ref-pairs.jsonl"
        user = {"role": "user", "content": "Say hello."}
        source.write_text(json.dumps({"chosen": [user, {"role": "assistant", "content": "Hello!"}],
                                      "rejected": [user, {"role": "assistant", "content": "No."}]}) + "\n")
        run("prepare-data", str(source), str(data), "--model", str(work / "tiny-instruct"), "--seq-len", "32")
    shutil.rmtree(out, ignore_errors=True)
    if not list((data / "reference").glob("*.safetensors")):
        run(*args)
        shutil.rmtree(out)
    [stored] = (data / "reference").glob("*.safetensors")
    raw = bytearray(stored.read_bytes())
    at = len(raw) - 1 - (from_end - 1) % len(raw)  # often in the values: the last 8 bytes hold the one pair's
    raw[at:at + len(junk)] = junk
    stored.write_bytes(bytes(raw))
    with unchanged(work, out, data / "reference"):
        result = run(*args)
    check("finetune --method dpo, damaged reference", result)
    if result[0] == 0:
        first = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])
        assert abs(first["loss"] - math.log(2)) < 1e-6, first


CONFIG_FIELDS = ["num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "vocab_size", "max_position_embeddings", "model_type"]


@FUZZ
@given(config=st.one_of(
    st.binary(max_size=80), RECORDS.map(lambda r: json.dumps(r).encode()),
    # tiny's own config with a field or two changed, most often to a valid value: past the first checks
    st.dictionaries(st.sampled_from(CONFIG_FIELDS), st.one_of(WEIRD_NUMBERS, WEIRD_TEXT, st.integers(1, 64)),
                    max_size=2).map(lambda changes: {"changes": changes}),
))
def test_estimate_reads_any_config(work, config):
    folder = work / "inputs" / "ckpt"
    folder.mkdir(exist_ok=True)
    if isinstance(config, dict):
        config = json.dumps({**json.loads((work / "tiny" / "config.json").read_text()), **config["changes"]}).encode()
    (folder / "config.json").write_bytes(config)
    with unchanged(work):
        check("estimate", run("estimate", str(folder), "--device", "cpu"))


# Fields of an OLMo-core experiment config (its "model" entry, a TransformerConfig), by path.
OLMO_CORE_FIELDS = ["d_model", "n_layers", "vocab_size", "block.sequence_mixer.n_heads",
                    "block.sequence_mixer.n_kv_heads", "block.feed_forward.hidden_size", "block.name",
                    "block.layer_norm.eps", "lm_head", "block.sequence_mixer.rope.theta", "_CLASS_"]


# Class names for a config's `_CLASS_`: a function OLMo-core's from_dict would call (deleting a folder), one outside
# OLMo-core, and a config class of OLMo-core's that is not the one the field holds.
OLMO_CORE_CLASSES = st.sampled_from(["olmo_core.io.clear_directory", "os.system", "olmo_core.config.Config",
                                     "olmo_core.nn.rope.RoPEConfig", "olmo_core..x", "olmo_core.internal.common.X"])


def olmo_core_indexes(work: Path) -> list[bytes]:
    """DCP indexes built from the classes an index may hold, that are no index: a set, an OrderedDict, a layout
    lookup of a name torch has not, and the tiny export's own index with its shards moved out of its folder, its
    shard entries emptied, and a tensor entry's size made a string."""
    import pickle
    from collections import OrderedDict

    index = (olmo_core_step(work) / "model_and_optim" / ".metadata").read_bytes()
    made = [pickle.dumps({1, 2}), pickle.dumps(OrderedDict(a=1)), pickle.dumps(frozenset()),
            b"ctorch.serialization\n_get_layout\n(Vbogus\ntR."]
    for change in ("outside", "no shards", "size"):
        metadata = pickle.loads(index)  # olmo2kit's own export: trusted
        if change == "outside":
            for info in metadata.storage_data.values():
                info.relative_path = "../../../oc-export/model_and_optim/" + info.relative_path
        elif change == "no shards":
            metadata.storage_data = None
        else:
            next(iter(metadata.state_dict_metadata.values())).size = "64"
        made.append(pickle.dumps(metadata))
    return made


def olmo_core_step(work: Path) -> Path:
    """A step directory of the tiny checkpoint exported to OLMo-core, made once."""
    step = work / "oc-export"
    if not (step / "config.json").exists():
        code, _, err = run("export", "olmo-core", str(work / "tiny"), str(step))
        assert code == 0, err
    return step


def set_path(config: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for key in parents:
        config = config.setdefault(key, {}) if isinstance(config.get(key, {}), dict) else {}
    config[last] = value


@FUZZ
@given(config=st.one_of(
    st.binary(max_size=80), JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    # the real config with a field or two changed, most often not at all: past the first checks
    st.dictionaries(st.sampled_from(OLMO_CORE_FIELDS),
                    st.one_of(WEIRD_NUMBERS, WEIRD_TEXT, st.integers(1, 64), st.just(1 << 20)),
                    max_size=2).map(lambda changes: {"changes": changes}),
), index=st.one_of(st.none(), st.none(), st.none(), st.binary(max_size=120)),
   tokenizer=st.one_of(st.none(), st.none(), WEIRD_TEXT))
def test_import_olmo_core_reads_any_checkpoint(work, config, index, tokenizer):
    """import olmo-core of the tiny export with its config.json and DCP index replaced by anything."""
    import shutil

    step, out = work / "inputs" / "oc-step", work / "oc-import"
    shutil.rmtree(step, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(olmo_core_step(work), step)
    if isinstance(config, dict):
        real = json.loads((step / "config.json").read_text())
        for path, value in config["changes"].items():
            set_path(real["model"], path, value)
        config = json.dumps(real).encode()
    (step / "config.json").write_bytes(config)
    if index is not None:
        (step / "model_and_optim" / ".metadata").write_bytes(index)
    args = ["import", "olmo-core", str(step), str(out), *([] if tokenizer is None else ["--tokenizer", tokenizer])]
    with unchanged(work, out, step, work / "oc-export"):
        check("import olmo-core", run(*args))
    assert FUZZ_OK["import olmo-core"] or FUZZ_COUNT["import olmo-core"] < EXAMPLES  # some inputs run to the end


def olmo_core_copy(work: Path) -> tuple[Path, Path]:
    """(a fresh copy of the tiny export, the output to import it into, made anew)."""
    import shutil

    step, out = work / "inputs" / "oc-step", work / "oc-import"
    shutil.rmtree(step, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(olmo_core_step(work), step)
    return step, out


@pytest.mark.parametrize("index", range(7))
def test_import_olmo_core_reads_any_index_of_allowed_classes(work, index):
    """import olmo-core of the tiny export with its DCP index one of `olmo_core_indexes`: pickles of the classes an
    index may hold that are no index, or that lead out of its folder. Each is refused in one line."""
    step, out = olmo_core_copy(work)
    (step / "model_and_optim" / ".metadata").write_bytes(olmo_core_indexes(work)[index])
    with unchanged(work, out, step):
        code, _, err = run("import", "olmo-core", str(step), str(out))
    check("import olmo-core", (code, _, err))
    assert code == 2 and "index" in err, err


@FUZZ
@given(klass=st.tuples(st.sampled_from(["_CLASS_", "lm_head._CLASS_", "block.layer_norm._CLASS_",
                                        "lm_head.layer_norm._CLASS_"]), OLMO_CORE_CLASSES))
def test_import_olmo_core_reads_any_class_name(work, klass):
    """import olmo-core of the tiny export with a `_CLASS_` of its config naming a function, a module outside
    OLMo-core, or another config class."""
    step, out = olmo_core_copy(work)
    real = json.loads((step / "config.json").read_text())
    set_path(real["model"], *klass)
    (step / "config.json").write_text(json.dumps(real))
    with unchanged(work, out, step):
        check("import olmo-core", run("import", "olmo-core", str(step), str(out)))


def test_olmo_core_conversions_refuse_bad_paths_in_one_line(work):
    """A missing directory, one that is no OLMo-core checkpoint, a run's folder of steps, an output that exists."""
    step, taken = olmo_core_step(work), work / "inputs"
    for args in (["import", "olmo-core", str(work / "missing"), str(work / "o1")],
                 ["import", "olmo-core", str(work / "tiny"), str(work / "o1")],
                 ["import", "olmo-core", str(work), str(work / "o1")],
                 ["import", "olmo-core", str(step), str(taken)],
                 ["export", "olmo-core", str(work / "tiny"), str(taken)],
                 ["export", "olmo-core", str(work / "missing"), str(work / "o1")]):
        with unchanged(work):
            code, _, err = run(*args)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (args, err)


SOUP_DAMAGE = st.one_of(
    st.none(), st.none(),  # the second checkpoint as it is
    st.dictionaries(st.sampled_from([*CONFIG_FIELDS, "rms_norm_eps", "tie_word_embeddings"]),
                    st.one_of(WEIRD_NUMBERS, WEIRD_TEXT, st.integers(1, 64)), max_size=2).map(lambda c: ("config", c)),
    st.tuples(st.just("bytes"), st.integers(0, 600), st.binary(min_size=1, max_size=16)),  # its safetensors header
    st.tuples(st.just("cut"), st.integers(0, 600_000)),
    st.tuples(st.just("index"), JSON_VALUES),
)
# --output: mostly soup-out (in the fuzz folder, where the commands run), else a path that names it otherwise, the
# current directory or one above it, or something there already.
SOUP_OUTPUTS = st.one_of(st.just("soup-out"), st.just("soup-out"),
                         st.sampled_from(["./soup-out/", "soup-out/.", "inputs/../soup-out", "soup-out/..", ".", "",
                                          "./", "..", "/", "inputs", "tiny", "tiny/config.json"]))
SOUP_WEIGHTS = st.one_of(st.none(), st.none(), WEIRD_TEXT,
                         st.lists(mostly(1, 2, 0.5), min_size=1, max_size=3).map(lambda ws: ",".join(map(str, ws))))


@FUZZ
@given(damage=SOUP_DAMAGE, weights=SOUP_WEIGHTS, compare=st.one_of(st.none(), st.just("tiny"), WEIRD_TEXT),
       output=SOUP_OUTPUTS)
def test_soup_reads_any_checkpoint_and_weights(work, damage, weights, compare, output):
    """soup of tiny and a copy of it with its config, safetensors or index damaged, with any --weights, --compare
    and --output."""
    import shutil

    other, out = work / "inputs" / "soup-b", work / "soup-out"
    shutil.rmtree(other, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(work / "tiny", other)
    kind = damage and damage[0]
    if kind == "config":
        config = json.loads((other / "config.json").read_text())
        (other / "config.json").write_text(json.dumps({**config, **damage[1]}))
    elif kind == "bytes":
        with open(other / "model.safetensors", "r+b") as f:
            f.seek(damage[1])
            f.write(damage[2])
    elif kind == "cut":
        os.truncate(other / "model.safetensors", damage[1])
    elif kind == "index":
        (other / "model.safetensors.index.json").write_text(json.dumps(damage[1]))
    args = ["soup", "tiny", str(other), f"--output={output}"]
    args += [] if weights is None else [f"--weights={weights}"]
    args += [] if compare is None else [f"--compare={compare}"]
    with unchanged(work, out, other, work / ".soup-out.soup.lock"):  # the lock file stays, as output_lock's do
        check("soup", run(*args))



def test_zz_the_fuzzed_inputs_reached_the_work():
    """Runs after the tests above in this file: inputs that are all refused at the first check prove little, so
    each command fuzzed with inputs that can be valid must have run some of them to the end."""
    for command in ("generate options", "estimate", "generate --input", "chat", "perplexity", "soup"):
        if FUZZ_COUNT[command]:
            assert FUZZ_OK[command] > 0, f"{command}: none of {FUZZ_COUNT[command]} inputs ran to the end"
