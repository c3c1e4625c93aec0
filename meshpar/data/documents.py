"""Documents from the inputs of `prepare-data` and `tokenizer train`: text files (one
document each), folders of them, JSON Lines, Parquet, and datasets saved with the
`datasets` library's `save_to_disk` (Arrow files, read here with pyarrow).

Every input is checked before anything is read in full (`find_sources`, then
`check_fields`), so a wrong path or a missing text field is one clear message.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".json", ".csv", ".html", ".c", ".h"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}
BATCH_ROWS = 1024  # rows read at once from Parquet and Arrow


class DocumentError(ValueError):
    """An input that cannot be read as documents, with the reason."""


@dataclass(frozen=True)
class Source:
    path: Path
    kind: str  # "text" | "jsonl" | "parquet" | "arrow" (one file of a saved dataset)


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DocumentError("Parquet and saved datasets are read with pyarrow: pip install pyarrow") from None
    return pyarrow


def _saved_dataset_files(folder: Path, split: str | None) -> list[Path]:
    """The Arrow files of a `save_to_disk` folder (a Dataset, or a DatasetDict's `split`)."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        chosen = split or "train"
        if chosen not in splits:
            raise DocumentError(f"{folder} is a saved DatasetDict without a split {chosen!r}; its splits: "
                                f"{', '.join(splits)} (choose one with --split)")
        folder = folder / chosen
    state = json.loads((folder / "state.json").read_text())
    return [folder / f["filename"] for f in state.get("_data_files", [])]


def _sources_in(folder: Path, split: str | None) -> list[Source]:
    if (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file():
        return [Source(f, "arrow") for f in _saved_dataset_files(folder, split)]
    found = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        if f.suffix in JSONL_SUFFIXES:
            found.append(Source(f, "jsonl"))
        elif f.suffix in PARQUET_SUFFIXES:
            found.append(Source(f, "parquet"))
        elif f.suffix in TEXT_SUFFIXES:
            found.append(Source(f, "text"))
    return found


def find_sources(inputs: list[str], split: str | None = None) -> list[Source]:
    """The files `inputs` name, in order (a folder's sorted); DocumentError for a path
    that does not exist or a folder with nothing readable."""
    if not inputs:
        raise DocumentError("no input given; name text files, folders, .jsonl, .parquet or saved datasets")
    sources = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            found = _sources_in(path, split)
            if not found:
                raise DocumentError(f"{given}: the folder holds nothing to read (text files "
                                    f"{', '.join(sorted(TEXT_SUFFIXES))}; {', '.join(sorted(JSONL_SUFFIXES))}; "
                                    f".parquet; or a dataset saved with save_to_disk)")
            sources += found
        elif path.is_file():
            kind = ("jsonl" if path.suffix in JSONL_SUFFIXES else "parquet" if path.suffix in PARQUET_SUFFIXES
                    else "arrow" if path.suffix == ".arrow" else "text")
            sources.append(Source(path, kind))
        else:
            raise DocumentError(f"{given}: no such file or folder")
    return sources


def _columns(source: Source) -> list[str]:
    pa = _pyarrow()
    if source.kind == "parquet":
        return list(pa.parquet.ParquetFile(source.path).schema_arrow.names)
    with pa.memory_map(str(source.path)) as stream:
        return list(pa.ipc.open_stream(stream).schema.names)


def check_fields(sources: list[Source], text_field: str) -> None:
    """DocumentError when a table input lacks `text_field` (its columns named) or a JSON
    Lines file's first record does (later records are checked as they are read)."""
    for source in sources:
        if source.kind in ("parquet", "arrow"):
            try:
                columns = _columns(source)
            except (OSError, ValueError) as err:  # pyarrow's errors derive from these
                raise DocumentError(f"{source.path}: not a readable {source.kind} file ({err})") from None
            if text_field not in columns:
                raise DocumentError(f"{source.path} has no column {text_field!r}; its columns: "
                                    f"{', '.join(columns)} (choose one with --text-field)")
        elif source.kind == "jsonl":
            with open(source.path, encoding="utf-8") as lines:
                first = next((line for line in lines if line.strip()), None)
            if first is not None:
                _text_of(first, source.path, 1, text_field)


def _text_of(line: str, path: Path, number: int, text_field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DocumentError(f"{path} line {number} is not JSON ({err.msg})") from None
    if not isinstance(record, dict) or text_field not in record:
        fields = ", ".join(record) if isinstance(record, dict) else f"a {type(record).__name__}, not an object"
        raise DocumentError(f"{path} line {number} has no field {text_field!r} (it has: {fields}; choose "
                            f"the field with --text-field)")
    text = record[text_field]
    if not isinstance(text, str):
        raise DocumentError(f"{path} line {number}: field {text_field!r} is {type(text).__name__}, not text")
    return text


def _read(source: Source, text_field: str) -> Iterator[str]:
    if source.kind == "text":
        try:
            yield source.path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise DocumentError(f"{source.path} is not UTF-8 text (byte {err.start}); convert it first") from None
    elif source.kind == "jsonl":
        with open(source.path, encoding="utf-8", newline="") as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    yield _text_of(line, source.path, number, text_field)
    else:
        pa = _pyarrow()
        if source.kind == "parquet":
            batches = pa.parquet.ParquetFile(source.path).iter_batches(batch_size=BATCH_ROWS, columns=[text_field])
        else:
            batches = pa.ipc.open_stream(pa.memory_map(str(source.path)))
        row = 0
        for batch in batches:
            for text in batch.column(text_field).to_pylist():
                if not isinstance(text, str):
                    raise DocumentError(f"{source.path} row {row}: {text_field!r} is {text!r}, not text")
                row += 1
                yield text


def read_documents(sources: list[Source], text_field: str = "text") -> Iterator[str]:
    """Every document of `sources`, in order."""
    for source in sources:
        yield from _read(source, text_field)
