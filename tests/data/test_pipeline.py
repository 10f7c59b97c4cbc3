"""Corpus loading, the token stream, and config checks that must fail before training starts."""

import numpy as np
import pytest

from deepsuite.data import (
    ByteTokenizer,
    PackedLoader,
    builtin_source_files,
    load_documents,
    token_stream,
    validate_data_config,
)
from deepsuite.data.corpus import check_source, is_val_index
from deepsuite.errors import DataError

from .conftest import DOCS

OK = dict(model_max_seq_len=64, world_size=2, micro_batch_size=2, global_batch_size=8)


def test_stream_is_documents_with_separators(make_cfg):
    cfg = make_cfg(val_fraction=0.1)
    tok = ByteTokenizer()
    cache = cfg.cache_dir
    train_t, train_s = token_stream(cfg, tok, "train", cache)
    val_t, val_s = token_stream(cfg, tok, "val", cache)
    # oracle: split by the index rule over the non-empty documents, tokenise each with [EOS] first
    val_docs = [d for i, d in enumerate(DOCS) if is_val_index(i, 0.1)]
    train_docs = [d for i, d in enumerate(DOCS) if not is_val_index(i, 0.1)]
    assert len(val_docs) == 6 and len(train_docs) == 54
    for toks, starts, docs in ((train_t, train_s, train_docs), (val_t, val_s, val_docs)):
        want = [t for d in docs for t in [tok.eos_id, *tok.encode(d)]]
        assert np.asarray(toks).tolist() == want
        assert (np.asarray(toks)[starts] == tok.eos_id).all() and len(starts) == len(docs)
        pieces = np.split(np.asarray(toks), starts[1:])
        assert [tok.decode(p.tolist()) for p in pieces] == docs
    assert not set(val_docs) & set(train_docs)


def test_cache_is_reused_and_keyed_by_tokenizer(make_cfg, tmp_path):
    cfg = make_cfg()
    a, _ = token_stream(cfg, ByteTokenizer(), "train", cfg.cache_dir)
    files = sorted(p.name for p in (tmp_path / "cache").rglob("*.npy"))
    b, _ = token_stream(cfg, ByteTokenizer(), "train", cfg.cache_dir)
    assert np.array_equal(a, b)
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*.npy")) == files


def test_text_and_parquet_sources_load(tmp_path, make_cfg):
    d = tmp_path / "txt"
    d.mkdir()
    for i, doc in enumerate(DOCS[:5]):
        (d / f"{i:02d}.txt").write_text(doc + "\nsecond line\n", encoding="utf-8")
    ds = load_documents(
        make_cfg(source=str(d), text_field="text", val_fraction=0.0, document_separator="file"),
        "train",
        streaming=False,
        hf_cache=str(tmp_path / "hf"),
    )
    assert ds["text"] == [doc + "\nsecond line\n" for doc in DOCS[:5]]  # one file = one document
    import datasets

    datasets.Dataset.from_dict({"t": DOCS[:7]}).to_parquet(str(tmp_path / "c.parquet"))
    cfg = make_cfg(source=str(tmp_path / "c.parquet"), text_field="t", val_fraction=0.0)
    assert (
        load_documents(cfg, "train", streaming=False, hf_cache=str(tmp_path / "hf"))["text"]
        == DOCS[:7]
    )


def test_builtin_corpus_is_stdlib_text(make_cfg):
    files = builtin_source_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    cfg = make_cfg(source="builtin", builtin_parts=["docs"], val_fraction=0.0, max_documents=5)
    docs = load_documents(cfg, "train", streaming=False, hf_cache=cfg.cache_dir)["text"]
    from pydoc_data.topics import topics

    assert docs == [topics[k] for k in sorted(topics)][:5]


# ---- bad config or data: clear errors before training ------------------------------------------
def test_validate_accepts_good_config(make_cfg):
    validate_data_config(make_cfg(), **OK)


@pytest.mark.parametrize(
    ("overrides", "kw", "match"),
    [
        ({"source": "/no/such/file.jsonl"}, {}, r"data\.source"),
        ({"source": "missing_dir/*.txt"}, {}, r"data\.source"),
        ({"seq_len": 65}, {}, r"data\.seq_len=65 is longer than the model allows"),
        ({}, {"world_size": 3, "global_batch_size": 8}, r"global_batch_size=8 .*world size 3"),
        ({}, {"micro_batch_size": 3}, r"micro_batch_size x world_size"),
        ({"tokenizer": "/no/tok"}, {}, r"data\.tokenizer"),
        ({"tokenizer": "bpe", "bpe_vocab_size": 100}, {}, r"data\.bpe_vocab_size"),
    ],
)
def test_validate_rejects(make_cfg, overrides, kw, match):
    with pytest.raises(ValueError, match=match):
        validate_data_config(make_cfg(**overrides), **{**OK, **kw})


def test_empty_corpus_raises(tmp_path, make_cfg):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        validate_data_config(make_cfg(source=str(empty)), **OK)
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"body": ""}\n{"body": ""}\n')
    for streaming in (False, True):
        with pytest.raises(ValueError, match=r"no non-empty documents|fewer than"):
            PackedLoader(
                make_cfg(source=str(blank), streaming=streaming), ByteTokenizer(), "train", 2
            )


def test_missing_text_field_raises(make_cfg):
    with pytest.raises(ValueError, match=r"data\.text_field"):
        PackedLoader(make_cfg(text_field="nope"), ByteTokenizer(), "train", 2)


def test_val_smaller_than_a_global_batch_raises(make_cfg):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PackedLoader(make_cfg(seq_len=64), ByteTokenizer(), "val", 8, dp_rank=0, dp_size=4)
    with pytest.raises(ValueError, match=r"data\.val_fraction"):
        PackedLoader(make_cfg(val_fraction=0.01), ByteTokenizer(), "val", 1)


def test_num_proc_gives_the_same_stream(make_cfg, tmp_path):
    one = make_cfg(cache_dir=str(tmp_path / "c1"))
    two = make_cfg(cache_dir=str(tmp_path / "c2"), num_proc=2)
    a, sa = token_stream(one, ByteTokenizer(), "train", one.cache_dir)
    b, sb = token_stream(two, ByteTokenizer(), "train", two.cache_dir)
    assert np.array_equal(a, b) and np.array_equal(sa, sb)


def test_unknown_hub_dataset_offline_raises(make_cfg):
    cfg = make_cfg(source="no-such-user/no-such-dataset-xyz")
    with pytest.raises(ValueError, match=r"data\.source: 'no-such-user/no-such-dataset-xyz'"):
        PackedLoader(cfg, ByteTokenizer(), "train", 1)


def test_builtin_loader_yields_stdlib_text(make_cfg):
    cfg = make_cfg(source="builtin", max_documents=100, val_fraction=0.05, seq_len=64)
    tok = ByteTokenizer()
    loader = PackedLoader(cfg, tok, "train", 4, shuffle=False)
    first = next(loader)["input_ids"][0].tolist()
    from pydoc_data.topics import topics

    assert first[0] == tok.eos_id
    assert tok.decode(first[1:]) == topics[sorted(topics)[0]].encode()[:63].decode(
        "utf-8", "replace"
    )
    assert len(PackedLoader(cfg, tok, "val", 4)) > 0


# ---- .txt files: documents end at blank lines, so a .txt corpus has a validation split -----------
@pytest.mark.parametrize("streaming", [False, True])
def test_txt_splits_into_documents_at_blank_lines(tmp_path, make_cfg, streaming):
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(f"{doc}\nits second line" for doc in DOCS), encoding="utf-8")
    hf = str(tmp_path / "hf")
    want = [f"{doc}\nits second line" for doc in DOCS]
    by = {
        "blank_line": want,
        "line": [line for doc in want for line in doc.split("\n")],
        "file": [path.read_text(encoding="utf-8")],
    }
    for sep, docs in by.items():
        cfg = make_cfg(
            source=str(path), text_field="text", val_fraction=0.0, document_separator=sep
        )
        assert [
            r["text"] for r in load_documents(cfg, "train", streaming=streaming, hf_cache=hf)
        ] == docs
    cfg = make_cfg(source=str(path), text_field="text", val_fraction=0.1)
    val = [r["text"] for r in load_documents(cfg, "val", streaming=streaming, hf_cache=hf)]
    assert val == [d for i, d in enumerate(want) if is_val_index(i, 0.1)] and len(val) == 6


def test_an_empty_split_says_what_helps(tmp_path, make_cfg):
    path = tmp_path / "one.txt"
    path.write_text("one document only, " * 50, encoding="utf-8")
    cfg = make_cfg(source=str(path), text_field="text", val_fraction=0.1, document_separator="file")
    with pytest.raises(DataError) as info:
        token_stream(cfg, ByteTokenizer(), "val", cfg.cache_dir)
    msg = str(info.value)
    assert "the corpus has 1 document" in msg and "floor(1 x 0.1) = 0" in msg
    assert "data.document_separator" in msg and "data.val_fraction=0" in msg
    few = make_cfg(val_fraction=0.01)  # 60 documents: none of them is 'val' at 1%
    with pytest.raises(DataError, match=r"raise data.val_fraction to at least 0.0167"):
        token_stream(few, ByteTokenizer(), "val", few.cache_dir)


def test_the_first_record_is_read_before_launch(tmp_path, make_cfg, jsonl_corpus):
    check_source(make_cfg())  # the fixture's field is 'body'
    with pytest.raises(
        DataError, match=r"data.text_field: 'text' is not a field .*\['body', 'id'\]"
    ):
        check_source(make_cfg(text_field="text"))
    with pytest.raises(DataError, match=r"data.text_field: 'id' .* holds int"):
        check_source(make_cfg(text_field="id"))
    (tmp_path / "t.csv").write_text("title,body\nx,some text\n")
    check_source(make_cfg(source=str(tmp_path / "t.csv")))  # .csv: one document per row
    assert not (tmp_path / "cache").exists()  # nothing cached by the check
