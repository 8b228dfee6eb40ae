"""Output directory life cycle: fingerprint, no-op re-runs, temporary build dir, atomic rename.

A dataset is built in ``.<name>.partial`` beside the final directory and renamed into place only
after its manifest is written, so a crash never leaves something that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import diffmoe
from diffmoe.data.config import EXECUTION_KEYS, CorpusConfig
from diffmoe.data.manifest import DatasetError, Manifest, read_manifest, verify_dataset
from diffmoe.data.sources import InputFile


def listing_hash(files: list[InputFile]) -> str:
    rows = [[f.uri, f.size, f.mtime_ns] for f in files]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def fingerprint(cfg: CorpusConfig, files: list[InputFile], tokenizer_sha: str | None) -> str:
    """Hash of everything that decides the shard bytes; execution settings are left out."""
    data = {
        "config": cfg.model_dump(mode="json", exclude=set(EXECUTION_KEYS)),
        "inputs": listing_hash(files),
        "tokenizer": tokenizer_sha,
        "version": diffmoe.__version__,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def existing_output(out: Path, fp: str, overwrite: bool, log: Callable[[str], None]) -> Manifest | None:
    """The manifest of a complete output made with the same fingerprint (a no-op re-run), else None.

    Raises rather than silently replacing an existing dataset made differently, unless ``overwrite``.
    """
    if not out.exists():
        return None
    try:
        manifest = read_manifest(out)
    except DatasetError as err:
        if overwrite:
            return None
        raise DatasetError(
            f"output {out} exists but is not a complete dataset ({err}); remove it or set overwrite: true"
        ) from None
    if manifest.fingerprint != fp:
        if overwrite:
            log(f"output {out} was made with a different config or inputs; overwriting")
            return None
        raise DatasetError(
            f"output {out} exists and was made with a different config or different inputs "
            f"(fingerprint {manifest.fingerprint[:12]} != {fp[:12]}); choose another output_dir "
            "or set overwrite: true"
        )
    try:
        return verify_dataset(out)
    except DatasetError as err:
        if overwrite:
            return None
        raise DatasetError(f"{err}; set overwrite: true to rebuild it") from None


def start_partial(out: Path, log: Callable[[str], None]) -> Path:
    """A fresh, empty build directory beside ``out`` (a crashed run's leftovers are discarded)."""
    partial = out.parent / f".{out.name}.partial"
    if partial.exists():
        log(f"discarding incomplete output of an earlier run: {partial}")
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def commit(partial: Path, out: Path, manifest: Manifest) -> None:
    """Write the manifest last, then rename the build directory into place atomically."""
    tmp = partial / "manifest.json.tmp"
    tmp.write_text(manifest.dump())
    os.replace(tmp, partial / "manifest.json")
    if out.exists():  # overwrite: move the old one aside first, then drop it
        old = out.parent / f".{out.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.rename(out, old)
        os.rename(partial, out)
        shutil.rmtree(old)
    else:
        os.rename(partial, out)
