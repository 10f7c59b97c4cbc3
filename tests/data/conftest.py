"""Shared fixtures for the data tests: offline hub, caches under a temp dir, small local corpora."""

import json
import os

# datasets reads these at import time: set them before anything imports it.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from deepsuite.config import DataConfig

# Real-looking documents of uneven lengths, including non-ASCII text and an empty one.
DOCS = [
    f"Document {i}: " + " ".join(f"w{(i * 7 + j) % 23}é" for j in range(5 + (i * 13) % 40))
    for i in range(60)
]


@pytest.fixture
def jsonl_corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i, d in enumerate(DOCS):
            f.write(json.dumps({"body": d, "id": i}) + "\n")
            if i == 3:
                f.write(json.dumps({"body": "", "id": -1}) + "\n")  # empty: must be dropped
    return path


@pytest.fixture
def make_cfg(tmp_path, jsonl_corpus):
    def make(**kw):
        base = dict(
            source=str(jsonl_corpus),
            text_field="body",
            seq_len=16,
            val_fraction=0.1,
            cache_dir=str(tmp_path / "cache"),
        )
        base.update(kw)
        return DataConfig(**base)

    return make
