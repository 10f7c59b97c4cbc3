"""Tokenizers: byte-level, locally trained BPE, and a local HF tokenizer directory."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepsuite.data import ByteTokenizer, build_tokenizer, load_hf_tokenizer, train_bpe
from deepsuite.data.tokenizer import EOS_TOKEN

from .conftest import DOCS


@given(st.text())
@settings(max_examples=200, deadline=None)
def test_byte_roundtrip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode([tok.eos_id, *ids, tok.eos_id]) == text  # separators are dropped


def test_bpe_trained_locally_roundtrips_and_compresses(tmp_path):
    tok = train_bpe(DOCS * 3, 400, tmp_path / "bpe" / "tokenizer.json")
    assert tok.vocab_size <= 400 and tok.vocab_size > 257
    text = "Document 17: w3é w10é — unseen ünïcode and 😀 emoji\n\ttabs  spaces"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.eos_id not in ids
    # learnt merges: corpus text takes fewer tokens than its UTF-8 bytes
    assert len(tok.encode(DOCS[5])) < 0.7 * len(DOCS[5].encode())
    # saved file loads back with the same ids
    again = load_hf_tokenizer(tmp_path / "bpe")
    assert again.encode(text) == ids and again.fingerprint == tok.fingerprint


def test_build_tokenizer_bpe_is_cached_per_corpus(make_cfg):
    cfg = make_cfg(tokenizer="bpe", bpe_vocab_size=300)
    a = build_tokenizer(cfg)
    b = build_tokenizer(cfg)  # loads the cached file
    assert a.fingerprint == b.fingerprint
    assert a.decode(a.encode(DOCS[0])) == DOCS[0]


def test_local_hf_tokenizer_dir_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    trained = train_bpe(DOCS, 320, tmp_path / "raw.json")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "raw.json"), eos_token=EOS_TOKEN
    )
    fast.save_pretrained(tmp_path / "hf_tok")
    tok = load_hf_tokenizer(tmp_path / "hf_tok")
    assert tok.eos_id == fast.eos_token_id
    assert tok.vocab_size == len(fast)
    assert (
        tok.encode(DOCS[2])
        == fast.encode(DOCS[2], add_special_tokens=False)
        == trained.encode(DOCS[2])
    )
    assert tok.decode(tok.encode(DOCS[2])) == DOCS[2]


def test_missing_tokenizer_path_raises(tmp_path):
    with pytest.raises(ValueError, match=r"data\.tokenizer"):
        load_hf_tokenizer(tmp_path / "nope")


def test_tokenizer_without_eos_raises(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE()).save(str(tmp_path / "t.json"))
    with pytest.raises(ValueError, match="separator"):
        load_hf_tokenizer(tmp_path / "t.json")
