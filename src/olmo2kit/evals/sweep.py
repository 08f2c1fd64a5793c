"""Sweeps: one metric over a series of training checkpoints, one JSON line per checkpoint, and a plot.

A sweep evaluates revisions (Hub branches) in training order: it loads each through
`olmo2kit.load`, measures perplexity over a text file or an lm-eval task, and appends one
JSON line to the results file, flushed and fsync'd before the next revision starts. Run it
again and it skips the revisions already in the file, so a killed sweep resumes where it
stopped; a line torn by the kill is dropped. `delete_after` frees each revision's files from
the Hugging Face cache once it is measured, so a sweep over hundreds of checkpoints needs the
disk of one (on Ray, each node the disk of one for each task it runs at once). The plot (metric
against training tokens, stage boundary marked) is redrawn after each revision.

    >>> sweep = Sweep("1b", "perplexity", data="wiki.txt", stage=1, every=50, out="ppl.jsonl")  # doctest: +SKIP
    >>> for step in sweep.run():  # doctest: +SKIP
    ...     print(step.row["revision"], step.row["value"])
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import io
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from olmo2kit.devices import resolve_device, resolve_dtype
from olmo2kit.errors import Olmo2KitError
from olmo2kit.evals.perplexity import check_window, perplexity, read_text
from olmo2kit.evals.tasks import check_task_options, check_tasks, evaluate_tasks
from olmo2kit.files import JsonlStore, make_output_dir, output_lock, write_atomic
from olmo2kit.inference.ray_pool import RayOptions, RayPool, UnitDone
from olmo2kit.model.engines import choose_engine, engine_info, load_model
from olmo2kit.model.gguf import record_path
from olmo2kit.model.hub_cache import delete_cached_revision
from olmo2kit.model.llamacpp import LlamaCppModel, gguf_type_for
from olmo2kit.model.loading import resolve_model
from olmo2kit.model.revisions import Revision, check_revision, check_stage, list_revisions, training_order
from olmo2kit.model.vllm import VllmModel, VllmOptions

PERPLEXITY = "perplexity"


@dataclass
class SweepStep:
    """One revision measured (or, on Ray, failed for good): its results line, where the sweep stands, and what
    is left."""

    row: dict | None  # the line appended to the results file; None for a revision that failed
    index: int  # 1-based, among the revisions this run measures
    total: int  # revisions this run measures (those already in the file are not counted)
    elapsed_s: float  # since the run started
    eta_s: float  # estimated time to the end of the run
    freed_bytes: int  # removed from the Hugging Face cache (delete_after)
    revision: str = ""  # the revision's name
    error: str | None = None  # why it failed (on Ray, after its retries), one line; None when measured


class Sweep:
    """A metric over a model's checkpoints. Building one checks every option, lists the revisions
    and reads the results file; no model loads until `run()`.

    `metric` is "perplexity" (over the text file `data`, with `stride` and `max_length`) or an
    lm-eval task name, optionally with the metric to plot: "arc_easy" or "arc_easy:acc_norm"
    (with `limit`, `num_fewshot`, `include_path`, `batch_size`). Revisions are the model's
    checkpoint branches in training order, kept by `stage`, then every `every`-th from the
    first; or exactly the names in `revisions`.

    With `ray`, each revision is a Ray task (`inference.ray_pool`) and this process alone writes the results,
    in the order the revisions finish; one that still fails after its retries is left out of the file, yielded
    with its `error` and named in `failed`, and the others go on. "auto" (engine, device, dtype) then means what
    it means on a worker, asked once before the sweep; `pool` is the connection (`close()` it when done).
    """

    def __init__(
        self,
        model: str,
        metric: str = PERPLEXITY,
        *,
        out: str | os.PathLike,
        data: str | os.PathLike | None = None,
        stage: int | None = None,
        every: int | None = None,
        revisions: list[str] | None = None,
        plot: str | os.PathLike | None = None,
        delete_after: bool = False,
        dtype: str = "auto",
        quantize: str | None = None,
        device: str = "auto",
        stride: int | None = None,
        max_length: int | None = None,
        limit: int | None = None,
        num_fewshot: int | None = None,
        include_path: str | os.PathLike | None = None,
        batch_size: int = 1,
        engine: str = "transformers",
        vllm: VllmOptions | None = None,
        ray: RayOptions | None = None,
    ) -> None:
        ref = resolve_model(model)
        if ref.local or ref.revision:
            raise Olmo2KitError(
                f"a sweep runs over the checkpoint branches of a Hub repo: pass a size alias or a repo id, not {model}"
            )
        self.repo_id = ref.source
        self.out = Path(out)
        self.plot_path = None if plot is None else Path(plot)
        # Checked now: otherwise a bad path fails only after the first revision is downloaded and measured.
        for option, path in (("--out", self.out), ("--plot", self.plot_path)):
            if path is not None:
                _check_writable(path, option)
        self.delete_after = delete_after
        self.metric = metric
        self.task, _, self.task_metric = metric.partition(":")
        self.text = self._check_metric(data, stride, max_length, limit, num_fewshot, include_path, batch_size)
        names = _revision_names(revisions)
        self.metric_options = (
            dict(stride=stride, max_length=max_length) if self.task == PERPLEXITY
            else dict(limit=limit, num_fewshot=num_fewshot, include_path=include_path, batch_size=batch_size)
        )
        everything = list_revisions(self.repo_id)
        self.revisions = self._select(everything, stage, every, names)
        # Stage-2 branches count their tokens from the start of stage 2, which began where stage 1 ended.
        self.stage2_start_b = max((r.tokens_b for r in everything if r.stage == 1), default=0)
        self.failed: dict[str, str] = {}  # revision -> why, for those that failed on Ray after their retries
        # Connected last, once everything else is known good: a bad address fails before any download.
        self.pool = None if ray is None else RayPool(ray)
        try:
            where = WhereItLoads(engine, self.repo_id, quantize, device, vllm, dtype)
            engine, resolved_dtype, self.engine_note = where() if self.pool is None else self.pool.call(where)
            self.load_options = dict(engine=engine, vllm=vllm, dtype=dtype, quantize=quantize, device=device)
            self.setup = {
                "model": self.repo_id,
                "metric": metric,
                "data_sha256": None if self.text is None else hashlib.sha256(self.text.encode()).hexdigest(),
                "stride": stride, "max_length": max_length, "limit": limit, "num_fewshot": num_fewshot,
                "dtype": resolved_dtype, "quantize": quantize,
            }
            self._read_done(read_results(self.out))
        except BaseException:
            if self.pool is not None:
                self.pool.close()
            raise

    def _read_done(self, rows: list[dict]) -> None:
        """Take the results file's rows as done (same setup only) and the rest of the revisions as to do."""
        self.done = rows
        self._check_setup()
        measured = {row["revision"] for row in self.done}
        self.todo = [r for r in self.revisions if r.name not in measured]

    def _check_metric(self, data, stride, max_length, limit, num_fewshot, include_path, batch_size) -> str | None:
        if self.task == PERPLEXITY:
            if self.task_metric:
                raise Olmo2KitError(f"--metric {self.metric}: perplexity has no sub-metric, use --metric perplexity")
            if data is None:
                raise Olmo2KitError("--metric perplexity needs --data FILE, a text file to measure")
            if limit is not None or num_fewshot is not None or include_path is not None:
                raise Olmo2KitError("--limit, --num-fewshot and --include-path apply to lm-eval tasks, not perplexity")
            check_window(max_length, stride)
            return read_text(data)
        if data is not None:
            raise Olmo2KitError("--data is for --metric perplexity: an lm-eval task brings its own data")
        if stride is not None or max_length is not None:
            raise Olmo2KitError("--stride and --max-length apply to --metric perplexity")
        check_task_options(limit, num_fewshot, batch_size)
        check_tasks([self.task], include_path)
        return None

    def _select(
        self, everything: list[Revision], stage: int | None, every: int | None, names: list[str] | None
    ) -> list[Revision]:
        if names is not None:
            if stage is not None or every is not None:
                raise Olmo2KitError("give --revisions, or --stage and --every, not both")
            by_name = {r.name: r for r in everything}
            for name in names:
                if name not in by_name:
                    check_revision(self.repo_id, name)  # raises, naming the nearest branches
                    raise Olmo2KitError(f"{self.repo_id} lists no revision {name!r}")
            return sorted({by_name[n] for n in names}, key=training_order)
        check_stage(stage)
        if every is not None and every < 1:
            raise Olmo2KitError(f"--every must be 1 or more, not {every}")
        checkpoints = [r for r in everything if r.stage is not None and (stage is None or r.stage == stage)]
        if not checkpoints:
            where = f"stage-{stage} " if stage else ""
            raise Olmo2KitError(
                f"{self.repo_id} has no {where}checkpoint branches: `olmo2kit list-revisions {self.repo_id}` "
                "shows what it has"
            )
        return checkpoints[:: every or 1]

    def _check_setup(self) -> None:
        for row in self.done:
            old = row.get("setup", {})
            changed = sorted(k for k in self.setup.keys() | old.keys() if old.get(k) != self.setup.get(k))
            if changed:
                what = ", ".join(f"{k} {old.get(k)!r} there, {self.setup.get(k)!r} now" for k in changed)
                raise Olmo2KitError(
                    f"{self.out} holds results of another setup ({what}): "
                    "rerun with the same options to resume it, or pass another --out"
                )

    def run(self) -> Iterator[SweepStep]:
        """Measure the revisions not yet in the results file, in training order, one step each.

        The results file is locked for the whole run (`files.output_lock`): a second sweep on the same
        `out` is an Olmo2KitError naming the run that holds it. The file is read again under the lock,
        so what another run added since this Sweep was built is not measured twice.
        """
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with output_lock(self.out, option="--out"):
            yield from self._run_locked()

    def _run_locked(self) -> Iterator[SweepStep]:
        store = results_store(self.out)
        store.repair()
        self._read_done(store.read())
        measure = RevisionMeasure(self.repo_id, self.metric, self.text, self.load_options, self.metric_options,
                                  self.setup, self.stage2_start_b, self.delete_after)
        if self.pool is None:
            done = (UnitDone(revision.name, measure(revision)) for revision in self.todo)
        else:
            done = self.pool.map(measure, {revision.name: (revision,) for revision in self.todo})
        self.failed = {}
        start = time.perf_counter()
        for index, unit in enumerate(done, 1):
            row, freed = (None, 0) if unit.error is not None else unit.value
            if row is None:
                self.failed[unit.key] = unit.error
            else:
                store.append([row])  # the driver alone writes the results, whichever worker measured the row
                self.done.append(row)
                if self.plot_path is not None:
                    plot_results(self.done, self.plot_path)
            elapsed = time.perf_counter() - start
            eta = elapsed / index * (len(self.todo) - index)
            yield SweepStep(row, index, len(self.todo), elapsed, eta, freed, unit.key, unit.error)
        if self.plot_path is not None and not self.todo:
            plot_results(self.done, self.plot_path)


@dataclass(frozen=True)
class WhereItLoads:
    """What "auto" means where the revisions load (this process, or a Ray worker): calling it returns the engine,
    the dtype's name (the results' setup records it) and, for engine "auto", the line saying which and why."""

    engine: str
    repo_id: str
    quantize: str | None
    device: str
    vllm: VllmOptions | None
    dtype: str

    def __call__(self) -> tuple[str, str, str | None]:
        said = []
        engine = choose_engine(self.engine, self.repo_id, quantize=self.quantize, device=self.device,
                               options=self.vllm, say=said.append)
        if self.vllm is not None and engine != "vllm":
            raise Olmo2KitError(f"the vLLM engine options need the vLLM engine, and the engine is {engine} "
                                f"({said[0] if said else 'as asked'}): give --engine vllm")
        return engine, _dtype_name(engine, self.dtype, self.quantize, self.device), (said[0] if said else None)


@dataclass(frozen=True)
class RevisionMeasure:
    """What measuring one revision needs, and nothing of the sweep's results file: called in the sweep's own
    process, or sent to a Ray worker as it is. Calling it loads the revision, measures it, frees it (and its
    cache, with `delete_after`) and returns (its results line, bytes freed from the cache)."""

    repo_id: str
    metric: str
    text: str | None
    load_options: dict
    metric_options: dict
    setup: dict
    stage2_start_b: int
    delete_after: bool

    def __call__(self, revision: Revision) -> tuple[dict, int]:
        options = self.load_options
        dtype = _dtype_name(options["engine"], options["dtype"], options["quantize"], options["device"])
        if dtype != self.setup["dtype"]:  # a cluster of unlike machines: rows of one file share one dtype
            raise Olmo2KitError(f"--dtype {options['dtype']} is {dtype} here, and {self.setup['dtype']} in this "
                                f"sweep's setup: give --dtype {self.setup['dtype']}")
        load_start = time.perf_counter()
        model, tokenizer = load_model(self.repo_id, revision=revision.name, **self.load_options)
        eval_start = time.perf_counter()
        value, details = self._measure(model, tokenizer)
        engine = engine_info(model)
        row = {
            "revision": revision.name,
            **{key: value for key, value in revision.to_dict().items() if key != "name"},
            "train_tokens_b": self._train_tokens_b(revision),
            "metric": self.metric,
            "value": value,
            "details": details,
            "setup": self.setup,
            **engine,
            "load_s": round(eval_start - load_start, 3),
            "eval_s": round(time.perf_counter() - eval_start, 3),
            "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        gguf = model.gguf if isinstance(model, LlamaCppModel) else None
        if isinstance(model, VllmModel | LlamaCppModel):
            model.close()  # its engine and memory go before the next revision loads
        del model, tokenizer
        _free_memory()
        freed = 0
        if self.delete_after:
            freed = delete_cached_revision(self.repo_id, revision.commit, revision.name)
            freed += _delete_gguf(gguf) if gguf is not None else 0
        return row, freed

    def _measure(self, model, tokenizer) -> tuple[float, dict]:
        task, _, task_metric = self.metric.partition(":")
        if task == PERPLEXITY:
            result = perplexity(model, tokenizer, self.text, **self.metric_options)
            return result.perplexity, result.to_dict()
        scores = evaluate_tasks(model, tokenizer, [task], **self.metric_options)
        wanted = [s for s in scores if s.task == task and (s.metric == task_metric or not task_metric)]
        if not wanted:
            reported = ", ".join(sorted({s.metric for s in scores if s.task == task}))
            raise Olmo2KitError(f"lm-eval reported no {task_metric!r} for {task} (it reported: {reported})")
        return wanted[0].value, {"scores": [s.to_dict() for s in scores]}

    def _train_tokens_b(self, revision: Revision) -> int | None:
        if revision.tokens_b is None:
            return None
        return revision.tokens_b + (self.stage2_start_b if revision.stage == 2 else 0)


def _revision_names(revisions: list[str] | None) -> list[str] | None:
    """The names given, stripped, blanks left out; an Olmo2KitError when that leaves none (an empty
    --revisions must not fall through to every checkpoint). None: no names given."""
    if revisions is None:
        return None
    names = [name.strip() for name in revisions if name.strip()]
    if not names:
        raise Olmo2KitError("--revisions names no revision: give branch names, comma-separated, or leave it out "
                            "to choose by --stage and --every")
    return names


def results_store(path: str | os.PathLike) -> JsonlStore:
    """The results file of a sweep: one JSON line per revision measured."""
    return JsonlStore(path, what="sweep results line", hint="pass another --out",
                      is_record=lambda row: isinstance(row.get("revision"), str)
                      and isinstance(row.get("setup", {}), dict))


def read_results(path: str | os.PathLike) -> list[dict]:
    """The lines of a results file, in file order; a torn last line is left out. [] if there is no file."""
    return results_store(path).read()


def curve_series(rows: list[dict]) -> tuple[dict[str, list[tuple[int, float]]], list[int]]:
    """What `plot_results` draws: ({label: [(training tokens in billions, value), ...]}, stage-2 start
    positions). Stage 1 is one line and each stage-2 ingredient another; rows without tokens are left out."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in sorted((r for r in rows if r.get("train_tokens_b") is not None), key=lambda r: r["train_tokens_b"]):
        label = "stage 1" if row["stage"] == 1 else f"stage 2, ingredient {row['ingredient']}"
        series.setdefault(label, []).append((row["train_tokens_b"], row["value"]))
    starts = {r["train_tokens_b"] - r["tokens_b"] for r in rows if r.get("stage") == 2 and r["tokens_b"] is not None}
    return dict(sorted(series.items())), sorted(starts)


def plot_results(rows: list[dict], path: str | os.PathLike) -> Path:
    """Draw the metric against training tokens to a PNG (see `curve_series`), the start of stage 2
    marked with a dashed line. Written atomically; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    series, stage2_starts = curve_series(rows)
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for label, points in series.items():
        axes.plot(*zip(*points, strict=True), "o-", label=label, ms=3)
    for x in stage2_starts:
        axes.axvline(x, color="gray", linestyle="--", linewidth=1)
        axes.text(x, 0.98, "stage 2 ", transform=axes.get_xaxis_transform(), rotation=90, ha="right", va="top",
                  color="gray", fontsize=8)
    metric = rows[0]["metric"] if rows else ""
    if metric == PERPLEXITY:
        axes.set_yscale("log")  # early checkpoints sit orders of magnitude above late ones
        axes.yaxis.set_major_formatter(LogFormatter())
        axes.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
    axes.set_xlabel("training tokens (billions)")
    axes.set_ylabel(metric)
    if rows:
        axes.set_title(rows[0]["setup"]["model"])
    if series:
        axes.legend()
    axes.grid(alpha=0.3)
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=120)
    return write_atomic(path, png.getvalue())


def _check_writable(path: Path, option: str) -> None:
    """Raise Olmo2KitError unless a file can be written at `path` (its directory is made if missing)."""
    if path.is_dir():
        raise Olmo2KitError(f"{option} {path} is a directory: give a file name")
    make_output_dir(path.parent)
    try:
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as e:
        raise Olmo2KitError(f"cannot write {option} {path} ({e.strerror}): give a place you can write to") from None


def _dtype_name(engine: str, dtype: str, quantize: str | None, device: str) -> str:
    """The name of what the weights run in, as a sweep's setup records it: the GGUF type on llama.cpp, else the
    torch dtype `dtype` means on `device` ("bfloat16")."""
    if engine == "llamacpp":
        return gguf_type_for(dtype, quantize)
    return str(resolve_dtype(dtype, resolve_device(device))).removeprefix("torch.")


def _delete_gguf(path: Path) -> int:
    """Remove a revision's GGUF (converted for llama.cpp) and its record from the GGUF cache; the bytes freed."""
    freed = 0
    for file in (path, record_path(path)):
        try:
            freed += file.stat().st_size
            file.unlink()
        except FileNotFoundError:
            pass
    return freed


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
