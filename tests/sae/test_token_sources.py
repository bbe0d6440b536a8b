"""Token sources: SAELens packing of text files, the synthetic language, tensors and functions,
cycling, and exact resumption from a saved position."""

from __future__ import annotations

import json
import random
import re
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from mechscope.loading import tokens as tok
from mechscope.sae.base import SAEError
from mechscope.sae.token_sources import LINES_PER_BLOCK, TokenSource, token_source
from mechscope.toys import zoo
from mechscope.toys.language import grammar

WORDS = ["Mary", "John", "went", "to", "the", "park", "gave", "a", "book", "store", ",", "."]
documents = st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=8).map(" ".join), min_size=1, max_size=6)
CHECK = settings(max_examples=15, deadline=None)


@pytest.fixture(scope="module")
def tokenizer(gpt2_dir):
    return AutoTokenizer.from_pretrained(gpt2_dir)


@pytest.fixture(scope="module")
def language_tokenizer():
    return zoo.load("language").tokenizer


def take(source, n: int) -> list[torch.Tensor]:
    return [next(source) for _ in range(n)]


def packed_rows(stream: list[int], bos: int, seq_len: int, n: int) -> list[list[int]]:
    """The SAELens convention written out: ``[BOS]`` then the next ``seq_len - 1`` stream tokens."""
    step = seq_len - 1
    return [[bos, *stream[i * step : (i + 1) * step]] for i in range(n)]


def write_lines(lines: list[str]) -> Path:
    path = Path(tempfile.mkdtemp()) / "docs.txt"
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


# ------------------------------------------------------------------ packing text
@CHECK
@given(docs=documents, seq_len=st.integers(2, 12))
def test_lines_are_documents_joined_by_bos_and_cut_into_bos_rows(tokenizer, docs, seq_len):
    bos = tok.bos_id(tokenizer)
    one_pass = [t for doc in docs for t in [*tokenizer(doc, add_special_tokens=False)["input_ids"], bos]]
    n = 3 * len(one_pass) // (seq_len - 1) + 1  # past the end of the file: it cycles
    source = token_source(write_lines(docs), tokenizer=tokenizer, seq_len=seq_len)
    rows = [row.tolist() for row in take(source, n)]
    assert rows == packed_rows(one_pass * (n * seq_len // len(one_pass) + 1), bos, seq_len, n)
    passes_read = -(-n * (seq_len - 1) // len(one_pass))  # whole passes over the file, tokenised on demand
    assert source.epoch == passes_read - 1


def test_blank_lines_are_not_documents(tokenizer):
    with_blanks = token_source(write_lines(["Mary went", "", "  ", "to the park"]), tokenizer=tokenizer, seq_len=6)
    without = token_source(write_lines(["Mary went", "to the park"]), tokenizer=tokenizer, seq_len=6)
    assert all(torch.equal(a, b) for a, b in zip(take(with_blanks, 8), take(without, 8), strict=True))


def test_a_whole_file_is_one_document_read_in_blocks(tokenizer):
    rng = random.Random(0)
    lines = [" ".join(rng.choices(WORDS, k=rng.randint(0, 6))) for _ in range(2 * LINES_PER_BLOCK + 37)]
    path = write_lines(lines)
    text = path.read_text(encoding="utf-8")
    bos = tok.bos_id(tokenizer)
    one_pass = [*tokenizer(text, add_special_tokens=False)["input_ids"], bos]  # one document: one BOS, at its end
    n = len(one_pass) // 15
    rows = [row.tolist() for row in take(token_source(path, tokenizer=tokenizer, seq_len=16, txt_documents="file"), n)]
    assert rows == packed_rows(one_pass, bos, 16, n)


@CHECK
@given(docs=documents)
def test_jsonl_reads_the_text_field_like_a_text_file(tokenizer, docs):
    path = Path(tempfile.mkdtemp()) / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    from_json = token_source(path, tokenizer=tokenizer, seq_len=5, text_field="body")
    from_text = token_source(write_lines(docs), tokenizer=tokenizer, seq_len=5)
    assert all(torch.equal(a, b) for a, b in zip(take(from_json, 10), take(from_text, 10), strict=True))


@CHECK
@given(docs=documents)
def test_parquet_reads_the_text_field_like_a_text_file(tokenizer, docs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(tempfile.mkdtemp()) / "docs.parquet"
    pq.write_table(pa.table({"id": list(range(len(docs))), "body": list(docs)}), path, row_group_size=2)
    from_parquet = token_source(path, tokenizer=tokenizer, seq_len=5, text_field="body")
    from_text = token_source(write_lines(docs), tokenizer=tokenizer, seq_len=5)
    assert all(torch.equal(a, b) for a, b in zip(take(from_parquet, 10), take(from_text, 10), strict=True))


def test_the_language_generator_draws_document_i_from_seed_and_i(language_tokenizer):
    bos = tok.bos_id(language_tokenizer)
    rows = take(token_source("language", tokenizer=language_tokenizer, seq_len=32, seed=7), 20)
    assert all(row[0] == bos for row in rows)
    stream = torch.cat([row[1:] for row in rows]).tolist()
    texts = [grammar.sample(random.Random(f"7:{i}")).text for i in range(len(stream))]  # more than enough
    ids = language_tokenizer(texts, add_special_tokens=False)["input_ids"]
    expected = [t for doc in ids for t in [*doc, bos]]
    assert stream == expected[: len(stream)]


def test_the_language_seed_changes_the_documents(language_tokenizer):
    a = take(token_source("language", tokenizer=language_tokenizer, seq_len=32, seed=0), 3)
    b = take(token_source("language", tokenizer=language_tokenizer, seq_len=32, seed=1), 3)
    again = take(token_source("language", tokenizer=language_tokenizer, seq_len=32, seed=0), 3)
    assert all(torch.equal(x, y) for x, y in zip(a, again, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------ tensors and functions
@CHECK
@given(n=st.integers(1, 6), seq_len=st.integers(2, 8), extra=st.integers(0, 10))
def test_a_tensor_is_read_row_by_row_and_cycles(n, seq_len, extra):
    tokens = torch.randint(0, 100, (n, seq_len))
    source = token_source(tokens, seq_len=seq_len)
    rows = take(source, n + extra)
    assert all(torch.equal(row, tokens[i % n]) for i, row in enumerate(rows))
    assert source.epoch == (n + extra) // n
    finite = token_source(tokens, seq_len=seq_len, cycle=False)
    assert len(list(finite)) == n


@CHECK
@given(batch=st.integers(0, 3), seq_len=st.integers(2, 6), n=st.integers(1, 12))
def test_a_function_of_the_step_gives_its_rows_in_order(batch, seq_len, n):
    calls = []

    def rows_of(step: int) -> torch.Tensor:
        calls.append(step)
        rows = batch if step % 2 == 0 else 1  # some steps give no rows at all
        return torch.arange(rows * seq_len).reshape(rows, seq_len) + 1000 * step

    expected = [row for step in range(4 * n + 1) for row in rows_of(step)][:n]
    calls.clear()
    got = take(token_source(rows_of, seq_len=seq_len), n)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert calls == sorted(set(calls))  # each step computed once, in order


def test_a_function_may_return_one_row():
    got = take(token_source(lambda step: torch.full((4,), step), seq_len=4), 3)
    assert [row.tolist() for row in got] == [[0] * 4, [1] * 4, [2] * 4]


# ------------------------------------------------------------------ resuming
def sources(tokenizer, language_tokenizer) -> dict[str, callable]:
    text = write_lines(["Mary went to the park", "John gave a book", "the store", "to Mary ."])
    tensor = torch.randint(0, 50, (5, 6))
    return {
        "text": lambda: token_source(text, tokenizer=tokenizer, seq_len=6),
        "file": lambda: token_source(text, tokenizer=tokenizer, seq_len=6, txt_documents="file"),
        "language": lambda: token_source("language", tokenizer=language_tokenizer, seq_len=6, seed=3),
        "tensor": lambda: token_source(tensor, seq_len=6),
        "function": lambda: token_source(lambda step: torch.arange(12).reshape(2, 6) * step, seq_len=6),
    }


@CHECK
@given(kind=st.sampled_from(["text", "file", "language", "tensor", "function"]), k=st.integers(0, 25))
def test_a_fresh_source_resumes_exactly_where_a_saved_one_was(tokenizer, language_tokenizer, kind, k):
    make = sources(tokenizer, language_tokenizer)[kind]
    uninterrupted = take(make(), k + 10)
    saved = make()
    take(saved, k)
    state = saved.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    resumed = make()
    resumed.load_state_dict(state)
    assert isinstance(resumed, TokenSource)
    assert all(torch.equal(a, b) for a, b in zip(take(resumed, 10), uninterrupted[k:], strict=True))


# ------------------------------------------------------------------ bad input
@pytest.mark.bad_input
def test_missing_libraries_are_named(tokenizer, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    (tmp_path / "docs.parquet").write_bytes(b"PAR1")
    with pytest.raises(SAEError, match="needs pyarrow"):
        token_source(tmp_path / "docs.parquet", tokenizer=tokenizer, seq_len=8)
    (tmp_path / "saved").mkdir()
    with pytest.raises(SAEError, match="needs `datasets`"):
        token_source(tmp_path / "saved", tokenizer=tokenizer, seq_len=8)


@pytest.mark.bad_input
def test_bad_specs_are_refused_by_name(tokenizer, tmp_path):
    (tmp_path / "docs.csv").write_text("a,b\n")
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "docs.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    cases = [
        (dict(spec=torch.zeros(3, 5, dtype=torch.long), seq_len=1), "seq_len must be at least 2"),
        (dict(spec=torch.zeros(3, 5, dtype=torch.long), seq_len=6), r"shape \[n, 6\]"),
        (dict(spec=torch.zeros(3, 5), seq_len=5), "integer ids"),
        (dict(spec=tmp_path / "nothing.txt", seq_len=5, tokenizer=tokenizer), "neither 'language' nor an existing"),
        (dict(spec=tmp_path / "docs.csv", seq_len=5, tokenizer=tokenizer), "suffix must be one of"),
        (dict(spec=tmp_path / "empty.txt", seq_len=5), "needs a tokenizer"),
        (dict(spec=tmp_path / "empty.txt", seq_len=5, tokenizer=tokenizer, txt_documents="pages"), "txt_documents"),
        (dict(spec=[1, 2, 3], seq_len=5), "cannot read tokens from a list"),
    ]
    for kwargs, message in cases:
        spec = kwargs.pop("spec")
        with pytest.raises(SAEError, match=message):
            token_source(spec, **kwargs)
    with pytest.raises(SAEError, match="contains no documents"):
        next(token_source(tmp_path / "empty.txt", tokenizer=tokenizer, seq_len=5))
    with pytest.raises(SAEError, match=r"docs.jsonl:2 has no string field 'text'"):
        take(token_source(tmp_path / "docs.jsonl", tokenizer=tokenizer, seq_len=5), 20)
    with pytest.raises(SAEError, match=r"shape \[4\] or \[batch, 4\]"):
        next(token_source(lambda step: torch.zeros(2, 3, dtype=torch.long), seq_len=4))


@pytest.mark.bad_input
def test_a_malformed_json_line_is_named_by_file_and_line(tokenizer, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": oops}\n{"text": "never read"}\n', encoding="utf-8")
    with pytest.raises(SAEError, match=rf"^{re.escape(str(path))}:3: not valid JSON"):
        take(token_source(path, tokenizer=tokenizer, seq_len=5), 20)


@pytest.mark.bad_input
@pytest.mark.parametrize("txt_documents", ["lines", "file"])
def test_bytes_that_are_not_utf8_are_named_by_file_and_line(tokenizer, tmp_path, txt_documents):
    path = tmp_path / "docs.txt"
    lines = 1000  # 10 kB before the bad byte: past the first block that text mode decodes at once
    path.write_bytes(b"Mary went\n" * lines + b"to the \xff park\n")
    source = token_source(path, tokenizer=tokenizer, seq_len=64, txt_documents=txt_documents)
    with pytest.raises(SAEError, match=rf"^{re.escape(str(path))}:{lines + 1}: not UTF-8 text"):
        take(source, 10 * lines)
