"""Token rows for the activation store, from a generator, a file, a dataset, a tensor or a function.

Text is packed the SAELens way: documents are tokenised with the model's tokenizer (no special
tokens), joined into one stream with a BOS token after each document, and cut into rows of
``seq_len`` tokens, each row starting with its own BOS (``[BOS] + seq_len - 1`` stream tokens), so
every row gives the model the attention sink it was trained with and documents may span rows.

Where the documents come from:

* ``"language"``: the synthetic-language generator (:mod:`mechscope.toys.language.grammar`),
  document ``i`` drawn from ``random.Random(f"{seed}:{i}")``; endless.
* ``.txt``: with ``txt_documents="lines"`` (the default) every non-blank line is a document; with
  ``"file"`` the whole file is one document (read and tokenised 256 lines at a time, so a large
  file never sits in memory whole).
* ``.jsonl``: one JSON object per line, the document in its ``text_field`` (default ``"text"``).
* ``.parquet``: the ``text_field`` column (needs ``pyarrow``).
* a directory saved with ``datasets.Dataset.save_to_disk`` (needs ``datasets``): its ``text_field``
  column (the ``train`` split of a ``DatasetDict``).

Files cycle: after the last document the source starts again and ``source.epoch`` counts the
passes (``cycle=False`` stops instead). A token tensor ``[n, seq_len]`` is read row by row (and
cycles the same way); a function ``step -> tokens`` (``[seq_len]`` or ``[batch, seq_len]``) is
called with ``step = 0, 1, 2, ...`` forever.

Every source is resumable: ``state_dict()`` is a flat dict of tensors (its position), and
``load_state_dict`` on a fresh source continues exactly where the saved one was. ``describe()``
names where a text source's rows come from (run.json and an activation cache record it, so a
resume or a cache read can check it); tensors and functions describe nothing.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from mechscope.loading import tokens as tok
from mechscope.sae.base import SAEError

TokenSpec = str | Path | Callable[[int], Tensor] | Tensor
Document = tuple[str, bool]  # a piece of text, and whether a document ends with it
DOCS_PER_CALL = 64  # documents tokenised per tokenizer call
LINES_PER_BLOCK = 256  # lines per piece when a whole .txt file is one document
SUFFIXES = (".txt", ".jsonl", ".parquet")


class TokenSource(Iterator[Tensor]):
    """An iterator of ``[seq_len]`` token rows whose position can be saved and restored."""

    epoch: int = 0

    def __iter__(self) -> TokenSource:
        return self

    def __next__(self) -> Int[Tensor, " seq"]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Where the rows come from, as JSON values (empty when that cannot be named)."""
        return {}


# ---------------------------------------------------------------- tensors and functions
class TensorSource(TokenSource):
    """The rows of a ``[n, seq_len]`` token tensor, in order, cycling."""

    def __init__(self, tokens: Int[Tensor, "n seq"], cycle: bool = True) -> None:
        self.tokens, self.cycle, self.row = tokens.long(), cycle, 0

    @property
    def epoch(self) -> int:
        return self.row // len(self.tokens)

    def __next__(self) -> Int[Tensor, " seq"]:
        if not self.cycle and self.row >= len(self.tokens):
            raise StopIteration
        row = self.tokens[self.row % len(self.tokens)]
        self.row += 1
        return row

    def state_dict(self) -> dict[str, Tensor]:
        return {"row": torch.tensor(self.row)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.row = int(state["row"])


class StepSource(TokenSource):
    """Rows of ``fn(0), fn(1), ...``, each call giving one row ``[seq_len]`` or a batch ``[batch, seq_len]``."""

    def __init__(self, fn: Callable[[int], Tensor], seq_len: int) -> None:
        self.fn, self.seq_len = fn, seq_len
        self.step, self.row, self._rows = 0, 0, None

    def _call(self, step: int) -> Int[Tensor, "batch seq"]:
        rows = torch.as_tensor(self.fn(step))
        rows = rows[None] if rows.ndim == 1 else rows
        if rows.ndim != 2 or rows.shape[1] != self.seq_len or rows.dtype.is_floating_point:
            raise SAEError(
                f"the token function returned a {rows.dtype} tensor of shape {tuple(rows.shape)} at step {step}; "
                f"it must return integer ids of shape [{self.seq_len}] or [batch, {self.seq_len}] (seq_len)"
            )
        return rows.long()

    def __next__(self) -> Int[Tensor, " seq"]:
        if self._rows is None:
            self._rows = self._call(self.step)
        while self.row >= len(self._rows):  # this step's rows are used up (or it gave none)
            self.step, self.row = self.step + 1, 0
            self._rows = self._call(self.step)
        row = self._rows[self.row]
        self.row += 1
        return row

    def state_dict(self) -> dict[str, Tensor]:
        return {"step": torch.tensor(self.step), "row": torch.tensor(self.row)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.step, self.row, self._rows = int(state["step"]), int(state["row"]), None


# ---------------------------------------------------------------- documents
def language_documents(seed: int) -> Callable[[int], Iterator[Document]]:
    """The synthetic language, document ``i`` a pure function of ``(seed, i)`` so seeking is free."""
    from mechscope.toys.language import grammar

    def read(skip: int) -> Iterator[Document]:
        for i in itertools.count(skip):
            yield grammar.sample(random.Random(f"{seed}:{i}")).text, True

    return read


def utf8_lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 file; bytes that are not UTF-8 are reported as ``path:line``."""
    try:
        with open(path, encoding="utf-8") as f:
            yield from f
    except UnicodeDecodeError as error:
        line = first_non_utf8_line(path)
        raise SAEError(f"{path}:{line}: not UTF-8 text ({error.reason}); convert the file to UTF-8") from None


def first_non_utf8_line(path: Path) -> int:
    """The number of the first line that does not decode as UTF-8 (the line after the last if all do)."""
    with open(path, "rb") as f:
        number = 0
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return number + 1


def text_lines(path: Path) -> Iterator[Document]:
    """Every non-blank line of a text file, one document each."""
    for line in utf8_lines(path):
        if line.strip():
            yield line.rstrip("\n"), True


def text_blocks(path: Path) -> Iterator[Document]:
    """A whole text file as one document, in pieces of ``LINES_PER_BLOCK`` lines (newlines kept)."""
    lines = utf8_lines(path)
    previous = None
    while block := "".join(itertools.islice(lines, LINES_PER_BLOCK)):
        if previous is not None:
            yield previous, False
        previous = block
    if previous is not None:
        yield previous, True


def json_lines(path: Path, field: str) -> Iterator[Document]:
    """The ``field`` of every JSON object in a ``.jsonl`` file."""
    for number, line in enumerate(utf8_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SAEError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise SAEError(f"{path}:{number} has no string field {field!r} (choose the field with text_field=)")
        yield record[field], True


def parquet_rows(path: Path, field: str) -> Iterator[Document]:
    """The ``field`` column of a Parquet file, read a batch of rows at a time (pyarrow checked up front)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as error:
        raise SAEError(f"reading {path.name} needs pyarrow, which is not installed: pip install pyarrow") from error
    file = pq.ParquetFile(path)
    if field not in file.schema_arrow.names:
        raise SAEError(f"{path} has no column {field!r} (text_field); columns: {', '.join(file.schema_arrow.names)}")
    batches = file.iter_batches(columns=[field], batch_size=1024)
    return ((text, True) for batch in batches for text in batch.column(0).to_pylist())


def dataset_rows(path: Path, field: str) -> Iterator[Document]:
    """The ``field`` column of a dataset saved with ``datasets`` (``save_to_disk``), checked up front."""
    try:
        import datasets
    except ImportError as error:
        raise SAEError(
            f"{path} is a directory: reading a saved dataset needs `datasets` (pip install datasets)"
        ) from error
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise SAEError(f"{path} holds splits {list(data)} but no 'train' split: save one split and pass its folder")
        data = data["train"]
    if field not in data.column_names:
        raise SAEError(f"{path} has no column {field!r} (text_field); columns: {', '.join(data.column_names)}")
    starts = range(0, len(data), 1024)
    return ((text, True) for start in starts for text in data[start : start + 1024][field])


# ---------------------------------------------------------------- packing
class PackedSource(TokenSource):
    """Documents tokenised, joined with BOS after each, cut into ``[BOS] + seq_len - 1`` token rows."""

    def __init__(
        self,
        read: Callable[[int], Iterator[Document]],
        tokenizer: Any,
        seq_len: int,
        name: str,
        cycle: bool = True,
        description: dict[str, Any] | None = None,
    ) -> None:
        self.read, self.tokenizer, self.seq_len, self.name, self.cycle = read, tokenizer, seq_len, name, cycle
        self.description = description or {}
        self.bos = tok.bos_id(tokenizer)
        if self.bos is None:
            raise SAEError("the tokenizer has neither a BOS nor an EOS token to separate documents with")
        self.epoch, self.index, self.carry = 0, 0, []  # documents read in this epoch; stream tokens not yet emitted
        self._documents: Iterator[Document] | None = None

    def __next__(self) -> Int[Tensor, " seq"]:
        while len(self.carry) < self.seq_len - 1:
            self._tokenise(self._next_documents())
        row, self.carry = [self.bos, *self.carry[: self.seq_len - 1]], self.carry[self.seq_len - 1 :]
        return torch.tensor(row, dtype=torch.long)

    def _next_documents(self) -> list[Document]:
        """Up to ``DOCS_PER_CALL`` documents, starting the next epoch when this one ends."""
        if self._documents is None:
            self._documents = self.read(self.index)
        documents = list(itertools.islice(self._documents, DOCS_PER_CALL))
        if documents:
            self.index += len(documents)
            return documents
        if self.index == 0:
            raise SAEError(f"{self.name} contains no documents")
        if not self.cycle:
            raise StopIteration
        self.epoch, self.index, self._documents = self.epoch + 1, 0, None
        return self._next_documents()

    def _tokenise(self, documents: list[Document]) -> None:
        ids = self.tokenizer([text for text, _ in documents], add_special_tokens=False)["input_ids"]
        for piece, (_, ends) in zip(ids, documents, strict=True):
            self.carry += [*piece, self.bos] if ends else piece

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "epoch": torch.tensor(self.epoch),
            "index": torch.tensor(self.index),
            "carry": torch.tensor(self.carry, dtype=torch.long),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self.carry, self._documents = state["carry"].tolist(), None

    def describe(self) -> dict[str, Any]:
        return dict(self.description)


# ---------------------------------------------------------------- the one entry point
def token_source(
    spec: TokenSpec,
    *,
    tokenizer: Any = None,
    seq_len: int,
    seed: int = 0,
    text_field: str = "text",
    txt_documents: Literal["lines", "file"] = "lines",
    cycle: bool = True,
) -> TokenSource:
    """Rows of ``seq_len`` token ids from ``spec`` (see the module docstring for what it may be)."""
    if seq_len < 2:
        raise SAEError(f"seq_len must be at least 2 (a BOS and one token), got {seq_len}")
    if isinstance(spec, Tensor):
        if spec.ndim != 2 or spec.shape[1] != seq_len or spec.shape[0] == 0 or spec.dtype.is_floating_point:
            raise SAEError(
                f"a token tensor must hold integer ids of shape [n, {seq_len}] (seq_len), got {spec.dtype} "
                f"of shape {tuple(spec.shape)}"
            )
        return TensorSource(spec, cycle)
    if callable(spec):
        return StepSource(spec, seq_len)
    if not isinstance(spec, str | Path):
        raise SAEError(
            f"cannot read tokens from a {type(spec).__name__}: pass a file, 'language', a tensor or a function"
        )
    if txt_documents not in ("lines", "file"):
        raise SAEError(f"txt_documents must be 'lines' or 'file', got {txt_documents!r}")
    read = _documents(spec, seed, text_field, txt_documents)
    if tokenizer is None:
        raise SAEError(f"reading text from {str(spec)!r} needs a tokenizer (the model has none: pass tokenizer=)")
    return PackedSource(read, tokenizer, seq_len, str(spec), cycle, describe(spec, seed, text_field, txt_documents))


def describe(spec: str | Path, seed: int, field: str, txt: str) -> dict[str, Any]:
    """What names a text source's documents: the generator and its seed, or the file and how it is read."""
    if spec == "language":
        return {"source": "language", "source_seed": seed}
    path = Path(spec).resolve()
    return {"source": str(path), **({"txt_documents": txt} if path.suffix == ".txt" else {"text_field": field})}


def _documents(spec: str | Path, seed: int, field: str, txt: str) -> Callable[[int], Iterator[Document]]:
    """A function ``skip -> documents after the first skip`` for a text spec."""
    if spec == "language":
        return language_documents(seed)
    path = Path(spec)
    if not path.exists():
        raise SAEError(f"token source {str(spec)!r} is neither 'language' nor an existing file or directory")
    if path.is_dir():
        read_all = partial(dataset_rows, path, field)
    elif path.suffix == ".txt":
        read_all = partial(text_lines if txt == "lines" else text_blocks, path)
    elif path.suffix == ".jsonl":
        read_all = partial(json_lines, path, field)
    elif path.suffix == ".parquet":
        read_all = partial(parquet_rows, path, field)
    else:
        raise SAEError(f"cannot read tokens from {path.name}: the suffix must be one of {', '.join(SUFFIXES)}")
    read_all()  # fail now, not at the first row, when a library or a column is missing
    return lambda skip: itertools.islice(read_all(), skip, None)
