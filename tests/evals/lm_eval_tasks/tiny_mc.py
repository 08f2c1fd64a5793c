"""Rows of the olmo2kit_tiny_mc task, read from the JSONL file beside this one.

lm-eval calls `load` for the task's `custom_dataset`. Reading the file here, rather than through
`dataset_path: json` with `data_files`, keeps the path independent of the working directory and
writes no datasets cache.
"""

import json
from pathlib import Path

from datasets import Dataset, DatasetDict

DATA = Path(__file__).with_name("olmo2kit_tiny_mc.jsonl")


def load(**metadata) -> DatasetDict:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    return DatasetDict({"test": Dataset.from_list(rows)})
