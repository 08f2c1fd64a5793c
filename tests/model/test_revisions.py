"""Checkpoint revisions: parsing, training order, filters, the refs cache, Hub errors, and
loading a revision end to end, all against the loopback Hub of tests/hub.py (real HTTP
through huggingface_hub and transformers; nothing mocked)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hub import BIG, GATED, MISSING, REPO, TOKEN, commit_for
from olmo2kit.errors import Olmo2KitError
from olmo2kit.model.revisions import (
    Revision,
    cache_dir,
    check_revision,
    list_revisions,
    nearest_revision,
    parse_revision,
    refs_cache_path,
    training_order,
)

OLMO2KIT = Path(sys.executable).with_name("olmo2kit")
KEYS = ["name", "stage", "ingredient", "step", "tokens_b", "commit"]
EARLY, LATE = "stage1-step1000-tokens3B", "stage1-step2000-tokens5B"  # org/repo's seeds 1 and 2


def olmo2kit(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(OLMO2KIT), *args], env=env, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *phrases: str) -> str:
    """Exit 2, nothing on stdout, one `error:` line on stderr holding every phrase, no traceback."""
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0]
    return lines[0]


# Parsing


@pytest.mark.parametrize(
    "name, fields",
    [
        ("stage1-step1907359-tokens4001B", (1, None, 1907359, 4001)),
        ("stage2-ingredient4-step35773-tokens300B", (2, 4, 35773, 300)),
        ("step1000-tokens5B", (1, None, 1000, 5)),  # older repos: unprefixed, stage 1
        ("main", (None, None, None, None)),
        ("v1.0", (None, None, None, None)),
        ("", (None, None, None, None)),
        ("stage3-step1-tokens1B", (None, None, None, None)),
        ("stage2-step1-tokens1B", (None, None, None, None)),  # stage 2 names its ingredient
        ("stage1-ingredient1-step1-tokens1B", (None, None, None, None)),
        ("stage1-step1-tokens1", (None, None, None, None)),
        ("stage1-step-1-tokens1B", (None, None, None, None)),
        ("Stage1-step1-tokens1B", (None, None, None, None)),
        ("stage1-step1-tokens1B-fix", (None, None, None, None)),
        ("stage1-step١-tokens1B", (None, None, None, None)),  # Arabic-Indic digit: not a step
    ],
)
def test_parse_revision(name, fields):
    revision = parse_revision(name, "c" * 40)
    assert (revision.stage, revision.ingredient, revision.step, revision.tokens_b) == fields
    assert (revision.name, revision.commit) == (name, "c" * 40)


def test_to_dict_has_exactly_the_six_fields():
    assert list(parse_revision("main").to_dict()) == KEYS
    assert parse_revision("stage2-ingredient1-step2-tokens3B", "ab").to_dict() == dict(
        name="stage2-ingredient1-step2-tokens3B", stage=2, ingredient=1, step=2, tokens_b=3, commit="ab"
    )


counts = st.integers(min_value=0, max_value=10**18)


@given(step=counts, tokens=counts, prefixed=st.booleans())
def test_every_stage1_name_parses_back(step, tokens, prefixed):
    name = f"{'stage1-' if prefixed else ''}step{step}-tokens{tokens}B"
    assert parse_revision(name) == Revision(name, 1, None, step, tokens, None)


@given(ingredient=counts, step=counts, tokens=counts)
def test_every_stage2_name_parses_back(ingredient, step, tokens):
    name = f"stage2-ingredient{ingredient}-step{step}-tokens{tokens}B"
    assert parse_revision(name) == Revision(name, 2, ingredient, step, tokens, None)


@given(st.text())
def test_any_string_parses_without_raising(name):
    revision = parse_revision(name)
    assert revision.name == name
    if revision.stage is None:
        assert (revision.ingredient, revision.step, revision.tokens_b) == (None, None, None)


near_misses = r"(stage[0-9]-)?(ingredient-?[0-9]{0,3}-)?step-?[0-9]{0,4}-tokens[0-9.]{0,4}B?"


@given(st.from_regex(near_misses, fullmatch=True))
def test_near_miss_names_parse_without_raising(name):
    revision = parse_revision(name)
    assert revision.stage in (None, 1, 2)
    assert (revision.step is None) == (revision.stage is None)


stage1_names = st.builds("stage1-step{}-tokens{}B".format, counts, counts)
stage2_names = st.builds("stage2-ingredient{}-step{}-tokens{}B".format, counts, counts, counts)


@given(st.lists(st.one_of(stage1_names, stage2_names, st.just("main"), st.text(max_size=12))))
def test_training_order_groups_and_sorts(branch_names):
    ordered = sorted(map(parse_revision, branch_names), key=training_order)
    groups = [{1: 0, 2: 1}.get(r.stage, 2 if r.name == "main" else 3) for r in ordered]
    assert groups == sorted(groups)
    assert [r.step for r in ordered if r.stage == 1] == sorted(r.step for r in ordered if r.stage == 1)
    stage2 = [(r.ingredient, r.step) for r in ordered if r.stage == 2]
    assert stage2 == sorted(stage2)
    others = [r.name for r in ordered if r.stage is None and r.name != "main"]
    assert others == sorted(others)


# Listing and filters


def names(revisions: list[Revision]) -> list[str]:
    return [r.name for r in revisions]


def test_listing_is_in_training_order(hub, hub_env):
    training_order = [
        "stage1-step1000-tokens3B", "stage1-step2000-tokens5B", "step3000-tokens7B",
        "stage1-step20000-tokens42B",  # by step, not by spelling
        "stage2-ingredient1-step100-tokens1B", "stage2-ingredient1-step200-tokens1B",
        "stage2-ingredient2-step10-tokens1B",
        "main",
        "alpha", "v1.0", "zeta",  # a tag is listed too
    ]
    shuffled = [training_order[i] for i in (10, 7, 6, 2, 3, 5, 8, 0, 4, 1)]
    hub.add_repo("org/mixed", dict.fromkeys(shuffled), tags={"v1.0": None})
    assert names(list_revisions("org/mixed")) == training_order


def test_every_branch_is_listed_with_its_commit(hub, hub_env):
    revisions = list_revisions(BIG)
    assert len(revisions) == 1000
    assert revisions[0] == Revision(
        "stage1-step1000-tokens3B", 1, None, 1000, 3, commit_for(BIG, "stage1-step1000-tokens3B")
    )
    assert revisions[899].name == "stage1-step900000-tokens1888B"
    assert revisions[900].name == "stage2-ingredient1-step1000-tokens3B"
    assert revisions[-1] == Revision("main", None, None, None, None, commit_for(BIG, "main"))


@pytest.mark.parametrize(
    "filters, expected",
    [
        (dict(step=140400), ["stage1-step140000-tokens294B"]),
        (dict(step=140500), ["stage1-step140000-tokens294B", "stage1-step141000-tokens296B"]),  # a tie
        (dict(tokens=294), ["stage1-step140000-tokens294B"]),
        (dict(tokens=295), ["stage1-step140000-tokens294B", "stage1-step141000-tokens296B"]),
        (dict(tokens=1e6), ["stage1-step900000-tokens1888B"]),
        (dict(step=0), ["stage1-step1000-tokens3B"]),
        (dict(stage=2, step=5000), [f"stage2-ingredient{k}-step5000-tokens11B" for k in (1, 2, 3)]),
        (dict(ingredient=2, step=5400), ["stage2-ingredient2-step5000-tokens11B"]),
        (dict(stage=2, ingredient=3, limit=2), ["stage2-ingredient3-step1000-tokens3B",
                                                "stage2-ingredient3-step2000-tokens5B"]),
        (dict(limit=3), ["stage1-step1000-tokens3B", "stage1-step2000-tokens5B", "stage1-step3000-tokens7B"]),
        (dict(limit=0), []),
        (dict(ingredient=7), []),
    ],
)
def test_filters(hub, hub_env, filters, expected):
    assert names(list_revisions(BIG, **filters)) == expected


def test_stage_and_ingredient_filters(hub, hub_env):
    stage2 = list_revisions(BIG, stage=2)
    assert len(stage2) == 99 and {r.stage for r in stage2} == {2}
    assert [(r.ingredient, r.step) for r in stage2] == sorted((r.ingredient, r.step) for r in stage2)
    ingredient2 = list_revisions(BIG, ingredient=2)
    assert [r.step for r in ingredient2] == list(range(1000, 34_000, 1000))
    assert {r.ingredient for r in ingredient2} == {2}
    assert len(list_revisions(BIG, stage=1)) == 900


def test_nearest_revision(hub, hub_env):
    assert nearest_revision(BIG, step=140500).name == "stage1-step140000-tokens294B"  # the earlier on a tie
    assert nearest_revision(BIG, tokens=4000).name == "stage1-step900000-tokens1888B"
    assert nearest_revision(BIG, tokens=20, stage=2).name == "stage2-ingredient1-step9000-tokens19B"


def test_size_alias_resolves_to_its_repo(hub, hub_env):
    hub.add_branches("allenai/OLMo-2-0425-1B", ["main", "stage1-step140000-tokens294B"])
    assert names(list_revisions("1b", step=140000)) == ["stage1-step140000-tokens294B"]
    assert hub.count("/api/models/allenai/OLMo-2-0425-1B/refs") == 1


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: list_revisions(BIG, step=1, tokens=1), "not both"),
        (lambda: list_revisions(BIG, stage=3), "no stage 3"),
        (lambda: list_revisions(BIG, stage=1, ingredient=1), "stage-2"),
        (lambda: list_revisions(BIG, limit=-1), "--limit must be 0 or more"),
        (lambda: nearest_revision(BIG), "step= or tokens="),
    ],
)
def test_bad_filters_fail_before_any_request(hub, hub_env, call, message):
    with pytest.raises(Olmo2KitError, match=message):
        call()
    assert hub.requests == []


def test_nearest_needs_the_stage_to_have_checkpoints(hub, hub_env):
    with pytest.raises(Olmo2KitError, match="no stage-2 checkpoint"):
        list_revisions(REPO, stage=2, step=100)


# The refs cache


def test_second_listing_is_served_from_the_cache(hub, hub_env):
    list_revisions(BIG)
    assert hub.count(f"/api/models/{BIG}/refs") == 1
    hub.reset()
    assert len(list_revisions(BIG, stage=2)) == 99
    assert hub.requests == []
    path = refs_cache_path(BIG)
    assert path.parent.parent == Path(os.environ["OLMO2KIT_CACHE_DIR"])
    assert [p.suffix for p in path.parent.iterdir()] == [".json"]  # no temporary file left behind


def test_refresh_skips_the_cache(hub, hub_env):
    list_revisions(REPO)
    hub.add_branches("org/growing", ["main"])
    list_revisions("org/growing")
    hub.repos["org/growing"].branches["stage1-step5-tokens1B"] = commit_for("org/growing", "x")
    assert names(list_revisions("org/growing")) == ["main"]
    hub.reset()
    assert names(list_revisions("org/growing", refresh=True)) == ["stage1-step5-tokens1B", "main"]
    assert hub.count("/api/models/org/growing/refs") == 1
    assert names(list_revisions("org/growing")) == ["stage1-step5-tokens1B", "main"]  # and rewrites it


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_cache_expires_after_an_hour(hub, hub_env):
    list_revisions(BIG)
    age(refs_cache_path(BIG), 3500)
    hub.reset()
    list_revisions(BIG)
    assert hub.requests == []
    age(refs_cache_path(BIG), 3601)
    list_revisions(BIG)
    assert hub.count(f"/api/models/{BIG}/refs") == 1
    assert time.time() - refs_cache_path(BIG).stat().st_mtime < 60


def test_cache_location_and_key(hub, hub_env, monkeypatch, tmp_path):
    from huggingface_hub import constants

    assert cache_dir() == Path(os.environ["OLMO2KIT_CACHE_DIR"])
    monkeypatch.delenv("OLMO2KIT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "olmo2kit"
    list_revisions(REPO)
    assert refs_cache_path(REPO).parent == tmp_path / "xdg" / "olmo2kit" / "refs"
    assert refs_cache_path(REPO).exists()
    here = refs_cache_path(BIG)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.example")
    assert refs_cache_path(BIG) != here  # another endpoint, another list


def test_offline_serves_the_cached_list_whatever_its_age(hub, hub_env, monkeypatch):
    from huggingface_hub import constants

    online = list_revisions(BIG)
    age(refs_cache_path(BIG), 30 * 24 * 3600)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.reset()
    assert list_revisions(BIG) == online
    assert hub.requests == []
    with pytest.raises(Olmo2KitError, match="HF_HUB_OFFLINE"):
        list_revisions(BIG, refresh=True)


def test_offline_without_a_cached_list_says_so(hub, hub_env, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(Olmo2KitError, match=f"no cached revision list for {BIG}"):
        list_revisions(BIG)
    assert hub.requests == []


def test_cli_offline_with_and_without_a_cached_list(hub, hub_env):
    offline = {**hub_env, "HF_HUB_OFFLINE": "1"}
    result = olmo2kit("list-revisions", BIG, env=offline)
    assert_one_line_error(result, "no cached revision list", "HF_HUB_OFFLINE")
    assert hub.requests == []
    online = olmo2kit("list-revisions", BIG, "--json", env=hub_env)
    assert online.returncode == 0, online.stderr
    assert hub.count(f"/api/models/{BIG}/refs") == 1
    hub.reset()
    cached = olmo2kit("list-revisions", BIG, "--json", env=offline)
    assert cached.returncode == 0, cached.stderr
    assert json.loads(cached.stdout) == json.loads(online.stdout)
    assert hub.requests == []


# The command line


def test_cli_json_has_exactly_the_six_keys(hub, hub_env):
    result = olmo2kit("list-revisions", BIG, "--json", env=hub_env)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert len(rows) == 1000 and all(list(row) == KEYS for row in rows)
    assert rows[0] == dict(name="stage1-step1000-tokens3B", stage=1, ingredient=None, step=1000, tokens_b=3,
                           commit=commit_for(BIG, "stage1-step1000-tokens3B"))
    assert rows[-1] == dict(name="main", stage=None, ingredient=None, step=None, tokens_b=None,
                            commit=commit_for(BIG, "main"))


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--step", "140500"], ["stage1-step140000-tokens294B", "stage1-step141000-tokens296B"]),
        (["--tokens", "294"], ["stage1-step140000-tokens294B"]),
        (["--stage", "2", "--ingredient", "3", "--limit", "2"],
         ["stage2-ingredient3-step1000-tokens3B", "stage2-ingredient3-step2000-tokens5B"]),
    ],
)
def test_cli_filters(hub, hub_env, args, expected):
    result = olmo2kit("list-revisions", BIG, *args, "--json", env=hub_env)
    assert result.returncode == 0, result.stderr
    assert [row["name"] for row in json.loads(result.stdout)] == expected


def test_cli_table(hub, hub_env):
    result = olmo2kit("list-revisions", BIG, "--ingredient", "1", "--limit", "2", env=hub_env)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["name", "stage", "ingredient", "step", "tokens", "commit"]
    first, second = "stage2-ingredient1-step1000-tokens3B", "stage2-ingredient1-step2000-tokens5B"
    assert [row.split() for row in rows] == [
        [first, "2", "1", "1000", "3B", commit_for(BIG, first)[:10]],
        [second, "2", "1", "2000", "5B", commit_for(BIG, second)[:10]],
    ]


def test_cli_bad_filters_are_one_line(hub_env):
    result = olmo2kit("list-revisions", BIG, "--step", "1", "--tokens", "2", env=hub_env)
    assert_one_line_error(result, "not both")


def test_list_revisions_imports_neither_torch_nor_transformers(hub, hub_env):
    code = textwrap.dedent(
        f"""
        import json, sys
        sys.argv = ["olmo2kit", "list-revisions", "{REPO}", "--json"]
        from olmo2kit.cli.app import main
        try:
            main()
        finally:
            heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
            print(json.dumps(heavy), file=sys.stderr)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], env=hub_env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stderr.strip().splitlines()[-1]) == []
    assert [row["name"] for row in json.loads(result.stdout)] == [EARLY, LATE, "main"]


# Hub errors: one line, exit 2, no traceback


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_missing_repo(hub, hub_env):
    line = assert_one_line_error(olmo2kit("list-revisions", MISSING, env=hub_env), f"{MISSING} not found")
    assert "HF_TOKEN" in line  # a private repo looks missing without one


def test_gated_repo_needs_a_token(hub, hub_env):
    result = olmo2kit("list-revisions", GATED, env=hub_env)
    assert_one_line_error(result, "needs a token", "HF_TOKEN", "hf auth login")
    wrong = "hf_wrongTokenThatMustNotBePrinted"
    result = olmo2kit("list-revisions", GATED, env={**hub_env, "HF_TOKEN": wrong})
    assert_one_line_error(result, "needs a token")
    assert wrong not in result.stderr
    result = olmo2kit("list-revisions", GATED, "--json", env={**hub_env, "HF_TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr
    assert [row["name"] for row in json.loads(result.stdout)] == ["stage1-step1000-tokens3B", "main"]
    assert TOKEN not in result.stdout + result.stderr


def test_unreachable_hub(hub_env):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    start = time.perf_counter()
    result = olmo2kit("list-revisions", BIG, env={**hub_env, "HF_ENDPOINT": endpoint})
    assert_one_line_error(result, f"cannot reach the Hub at {endpoint}", "HF_ENDPOINT", "HF_HUB_OFFLINE")
    assert time.perf_counter() - start < 20  # no long retry loop


def test_errors_in_python_are_olmo2kit_errors(hub, hub_env):
    with pytest.raises(Olmo2KitError, match="not found"):
        list_revisions(MISSING)
    with pytest.raises(Olmo2KitError, match="needs a token"):
        list_revisions(GATED)
    with pytest.raises(Olmo2KitError, match="not a size alias or a Hub repo id"):
        list_revisions("not a repo")


# check_revision: the guard before a download


def test_check_revision_accepts_existing_names_main_and_shas(hub, hub_env):
    check_revision(BIG, "main")
    check_revision(BIG, "0123456789abcdef0123456789abcdef01234567")
    check_revision(BIG, "refs/pr/3")
    assert hub.requests == []
    check_revision(BIG, "stage2-ingredient3-step33000-tokens70B")
    hub.reset()
    check_revision(BIG, "stage1-step140000-tokens294B")
    assert hub.requests == []  # from the same cached list


@pytest.mark.parametrize(
    "wanted, suggestion",
    [
        ("stage1-step140000-tokens293B", "did you mean stage1-step140000-tokens294B?"),  # a mis-rounded label
        ("stage1-step140400", "did you mean stage1-step140000-tokens294B?"),
        ("step140500", "did you mean stage1-step140000-tokens294B or stage1-step141000-tokens296B?"),
        ("tokens294B", "did you mean stage1-step140000-tokens294B?"),
        ("stage2-ingredient2-step5400-tokens11B", "did you mean stage2-ingredient2-step5000-tokens11B?"),
        ("mian", "did you mean main?"),
    ],
)
def test_check_revision_suggests_the_nearest(hub, hub_env, wanted, suggestion):
    with pytest.raises(Olmo2KitError) as error:
        check_revision(BIG, wanted)
    message = str(error.value)
    assert f"{BIG} has no revision {wanted!r}" in message and suggestion in message
    assert f"olmo2kit list-revisions {BIG}" in message


def test_check_revision_without_a_near_name(hub, hub_env):
    with pytest.raises(Olmo2KitError) as error:
        check_revision(REPO, "completely-different")
    assert "did you mean" not in str(error.value)


def test_check_revision_asks_again_for_a_branch_newer_than_the_cache(hub, hub_env):
    hub.add_branches("org/growing2", ["main"])
    list_revisions("org/growing2")
    hub.repos["org/growing2"].branches["stage1-step9-tokens1B"] = commit_for("org/growing2", "y")
    hub.reset()
    check_revision("org/growing2", "stage1-step9-tokens1B")
    assert hub.count("/api/models/org/growing2/refs") == 1


def test_check_revision_offline(hub, hub_env, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    check_revision(BIG, "no-such-branch")  # nothing cached: nothing to check against
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    list_revisions(BIG)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(Olmo2KitError, match="did you mean"):
        check_revision(BIG, "stage1-step1001-tokens3B")


# Loading a revision, end to end through huggingface_hub's download and cache


def served_weights(hub, revision: str) -> dict:
    from safetensors.torch import load

    return load(hub.repos[REPO].files[commit_for(REPO, revision)]["model.safetensors"])


def test_two_revisions_download_different_weights(hub, hub_env):
    import torch
    from huggingface_hub import snapshot_download
    from transformers import AutoModelForCausalLM

    early = Path(snapshot_download(REPO, revision=EARLY))
    assert early.is_relative_to(os.environ["HF_HUB_CACHE"])
    assert early.name == commit_for(REPO, EARLY)
    served = hub.repos[REPO].files[early.name]
    assert (early / "model.safetensors").read_bytes() == served["model.safetensors"]
    models = {
        EARLY: AutoModelForCausalLM.from_pretrained(early),
        LATE: AutoModelForCausalLM.from_pretrained(REPO, revision=LATE),
    }
    for revision, model in models.items():
        assert torch.equal(model.lm_head.weight, served_weights(hub, revision)["lm_head.weight"])
    assert not torch.equal(models[EARLY].lm_head.weight, models[LATE].lm_head.weight)
    assert hub.count("/lfs/") == 2  # each revision's weights fetched once, from the CDN


def test_load_a_revision_through_olmo2kit(hub, hub_env):
    import torch

    from olmo2kit.model.loading import load

    early, _ = load(f"{REPO}@{EARLY}", dtype="fp32", device="cpu")
    late, tokenizer = load(REPO, revision=LATE, dtype="fp32", device="cpu")
    main, _ = load(REPO, dtype="fp32", device="cpu")
    assert torch.equal(early.lm_head.weight, served_weights(hub, EARLY)["lm_head.weight"])
    assert torch.equal(late.lm_head.weight, served_weights(hub, LATE)["lm_head.weight"])
    assert not torch.equal(early.lm_head.weight, late.lm_head.weight)
    assert torch.equal(main.lm_head.weight, late.lm_head.weight)  # main is the last checkpoint
    assert tokenizer("hello").input_ids


def test_unknown_revision_fails_before_any_download(hub, hub_env):
    from olmo2kit.model.loading import load

    with pytest.raises(Olmo2KitError, match=f"did you mean {EARLY}\\?"):
        load(f"{REPO}@stage1-step1001-tokens3B", dtype="fp32", device="cpu")
    paths = [path for _, path in hub.requests]
    assert f"/api/models/{REPO}/refs" in paths
    assert set(paths) <= {f"/api/models/{REPO}", f"/api/models/{REPO}/refs"}  # repo info and refs, no file
    assert not Path(os.environ["HF_HUB_CACHE"], "models--org--repo").exists()


def test_cli_generate_from_a_revision(hub, hub_env):
    args = ["hello", "--max-new-tokens", "3", "--greedy", "--json", "--device", "cpu"]
    result = olmo2kit("generate", "--model", f"{REPO}@{EARLY}", *args, env=hub_env)
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout.splitlines()[-1])
    assert row["prompt"] == "hello" and 0 < row["new_tokens"] <= 3
    assert hub.count(f"/{REPO}/resolve/{commit_for(REPO, EARLY)}/model.safetensors") == 1
    hub.reset()
    result = olmo2kit("generate", "--model", REPO, "-r", "stage1-step2100-tokens5B", *args, env=hub_env)
    assert_one_line_error(result, f"did you mean {LATE}?")
    assert hub.count(f"/{REPO}/resolve/") == 0 and hub.count("/lfs/") == 0
