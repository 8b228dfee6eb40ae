"""Input resolution and reading: paths, directories, globs and URIs -> ordered Ray datasets.

Inputs are expanded on the driver into a sorted file list (the order every later stage keeps), so the
output depends only on the files, never on listing order or on how Ray schedules the reads.
"""

from __future__ import annotations

import os
import re
import sysconfig
from dataclasses import dataclass
from pathlib import PurePosixPath

from diffmoe.data.config import STDLIB, CorpusConfig

GLOB_CHARS = re.compile(r"[*?\[]")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


class InputError(ValueError):
    """An input path is missing, unreadable, or not in the configured format."""


@dataclass(frozen=True)
class InputFile:
    uri: str  # what Ray's readers are given: a local path or scheme://bucket/key
    size: int
    mtime_ns: int | None
    format: str  # text | jsonl | parquet


def file_format(path: str, configured: str) -> str:
    """The format of one file: the configured one, or (auto) by extension."""
    if configured != "auto":
        return configured
    name = path.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def _is_stdlib_source(rel: str) -> bool:
    parts = PurePosixPath(rel).parts
    return rel.endswith(".py") and not any(p in ("site-packages", "dist-packages") for p in parts)


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Glob -> regex where ``*`` stays inside one directory and ``**/`` spans any number."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _locate(spec: str):
    """(pyarrow filesystem, base directory or file, glob regex or None, URI prefix) of a spec."""
    import pyarrow.fs as pafs

    scheme, rest = spec.split("://", 1) if "://" in spec else ("", spec)
    pattern = None
    wild = GLOB_CHARS.search(rest)
    if wild:
        cut = rest[: wild.start()].rfind("/") + 1
        rest, pattern = rest[:cut], _glob_regex(rest[cut:])
    if scheme in ("", "file"):
        return pafs.LocalFileSystem(), os.path.abspath(rest or "."), pattern, ""
    fs, base = pafs.FileSystem.from_uri(f"{scheme}://{rest}")
    return fs, base.rstrip("/"), pattern, f"{scheme}://"


def _expand(spec: str, cfg: CorpusConfig) -> list[InputFile]:
    import pyarrow.fs as pafs

    if spec == STDLIB:
        fs, base, pattern, prefix = pafs.LocalFileSystem(), stdlib_root(), None, ""
    else:
        try:
            fs, base, pattern, prefix = _locate(spec)
        except (OSError, ValueError) as err:
            raise InputError(f"input {spec!r}: cannot open filesystem: {err}") from err
    try:
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.File and pattern is None:
            infos = [info]
        elif info.type == pafs.FileType.Directory:
            listed = fs.get_file_info(pafs.FileSelector(base, recursive=True))
            infos = [i for i in listed if i.is_file and _selected(spec, i.path[len(base) :], pattern, cfg)]
        else:
            return []
    except OSError as err:
        raise InputError(f"input {spec!r}: cannot list {base}: {err}") from err
    infos.sort(key=lambda i: i.path)
    return [InputFile(prefix + i.path, i.size, i.mtime_ns, file_format(i.path, cfg.format)) for i in infos]


def _selected(spec: str, rel: str, pattern: re.Pattern[str] | None, cfg: CorpusConfig) -> bool:
    rel = rel.lstrip("/")
    if spec == STDLIB:
        return _is_stdlib_source(rel)
    if any(part.startswith(".") for part in PurePosixPath(rel).parts):
        return False  # .git, .cache, editor files: never corpus (as in shell globs)
    if pattern is not None:
        return bool(pattern.match(rel))
    return not cfg.extensions or rel.endswith(tuple(cfg.extensions))


def resolve_inputs(cfg: CorpusConfig) -> tuple[list[InputFile], list[str]]:
    """Expand every input spec; returns (files in order, specs that matched nothing)."""
    files: list[InputFile] = []
    seen: set[str] = set()
    missing: list[str] = []
    for spec in cfg.inputs:
        found = _expand(spec, cfg)
        if not found:
            missing.append(spec)
        for f in found:
            if f.uri not in seen:
                seen.add(f.uri)
                files.append(f)
    if missing and cfg.missing_inputs == "error":
        raise InputError(
            f"input(s) matched no files: {missing} (set missing_inputs: skip to continue without them)"
        )
    if not files:
        raise InputError(f"no input files found in {cfg.inputs}")
    return files, missing


def check_parquet_columns(files: list[InputFile], column: str) -> None:
    """Fail before any work if a Parquet input lacks a text column (Ray's error would be obscure)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in files:
        if f.format != "parquet":
            continue
        try:
            schema = pq.read_schema(f.uri)
        except Exception as err:  # pyarrow raises several types for unreadable files
            raise InputError(f"{f.uri}: not a readable Parquet file: {err}") from err
        if column not in schema.names:
            raise InputError(f"{f.uri}: no column {column!r} (columns: {schema.names}); set text_field")
        kind = schema.field(column).type
        if not any(
            check(kind)
            for check in (
                pa.types.is_string,
                pa.types.is_large_string,
                pa.types.is_binary,
                pa.types.is_large_binary,
            )
        ):
            raise InputError(f"{f.uri}: column {column!r} has type {kind}, expected a string column")


def _parquet_to_raw(table, field: str):
    """Parquet records -> the ``{"bytes", "path"}`` rows that whole files arrive as."""
    import pyarrow as pa

    return pa.table({"bytes": table.column(field).cast(pa.binary()), "path": table.column("path")})


def read_groups(files: list[InputFile], cfg: CorpusConfig) -> list:
    """Ray datasets of ``{"bytes", "path"}`` rows, one per run of files that one reader takes.

    Text and JSONL files arrive whole (one row per file, split and parsed in the clean stage); Parquet
    inputs arrive one row per record. The clean stage tells them apart by ``file_format(path)``.
    The groups are meant to be consumed one after another: ``Dataset.union`` does not keep order.
    """
    import ray.data

    check_parquet_columns(files, cfg.text_field)
    datasets = []
    for group in _groups(files):
        uris = [f.uri for f in group]
        if group[0].format == "parquet":
            ds = ray.data.read_parquet(uris, include_paths=True, num_cpus=cfg.read_num_cpus)
            ds = ds.select_columns([cfg.text_field, "path"])
            ds = ds.map_batches(
                _parquet_to_raw,
                batch_format="pyarrow",
                fn_kwargs={"field": cfg.text_field},
                num_cpus=cfg.read_num_cpus,
            )
        else:
            ds = ray.data.read_binary_files(uris, include_paths=True, num_cpus=cfg.read_num_cpus)
        datasets.append(ds)
    return datasets


def _groups(files: list[InputFile]) -> list[list[InputFile]]:
    """Consecutive runs of files that one reader call can take (same reader, same scheme), in order."""
    groups: list[list[InputFile]] = []
    for f in files:
        if groups and _reader(groups[-1][0]) == _reader(f):
            groups[-1].append(f)
        else:
            groups.append([f])
    return groups


def _reader(f: InputFile) -> tuple[bool, str]:
    return f.format == "parquet", f.uri.split("://", 1)[0] if "://" in f.uri else ""
