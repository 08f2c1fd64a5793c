"""Published benchmark scores of OLMo 2 and its peers, shipped as data (published_scores.json).

The table is the instruct models' table of the OLMo 2 1B model card, values verbatim, with
its source recorded in the file, so a user can put their own `olmo2kit eval` numbers beside it.
"""

from __future__ import annotations

import json
from importlib import resources


def published_scores() -> dict:
    """The published table: `source`, `columns` (in the card's order), and `rows` of
    {"model": name, "scores": {column: value or None}} (None where the card says n/a).

    >>> published_scores()["rows"][-1]["scores"]["GSM8K"]
    68.3
    """
    return json.loads(resources.files("olmo2kit.evals").joinpath("published_scores.json").read_text(encoding="utf-8"))
