"""A per-node cache of models downloaded from MLflow, keyed by tracking URI + artifact URI.

Every replica, expert-parallel worker and evaluation task resolves its model source itself; without
a cache each would download the model again into a temp dir that nobody removes. Entries live in
``$DIFFMOE_MODEL_CACHE`` (default ``~/.cache/diffmoe/models``), one directory per hash of tracking
URI + artifact URI. Registry references that can move (``models:/name@alias``, ``/latest``,
``/<stage>``) are first pinned to the version they name now, so a key always names immutable
artifacts. A download lands in a private temp dir beside the entry and is renamed into place, so
concurrent processes never see a half-written model; the loser of a race discards its copy.
MLflow is imported inside the functions: ``import diffmoe.model`` stays light.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

CACHE_ENV = "DIFFMOE_MODEL_CACHE"
_META = ".diffmoe-source.json"  # written last inside the temp dir: an entry without it is not used
_MOVABLE = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<ref>[^/]+))(?P<rest>/.*)?$")


def cache_dir() -> Path:
    """Where downloaded models live: ``$DIFFMOE_MODEL_CACHE`` or ``~/.cache/diffmoe/models``."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/diffmoe/models").expanduser()


def download(source: str, tracking_uri: str | None = None) -> Path:
    """Local copy of the MLflow artifact ``source``: from the cache, else downloaded into it."""
    import mlflow

    if tracking_uri:  # process-wide, as before: MLflow resolves ``models:/`` via the global registry
        mlflow.set_tracking_uri(tracking_uri)
    tracking, registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    pinned = pin(source, registry)
    key = hashlib.sha256(f"{tracking}\n{pinned}".encode()).hexdigest()[:32]
    entry = cache_dir() / key
    hit = _cached(entry)
    if hit is not None:
        return hit
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=entry.parent))
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=pinned, dst_path=str(tmp), tracking_uri=tracking, registry_uri=registry
            )
        ).resolve()
        if not local.is_relative_to(tmp.resolve()):
            raise RuntimeError(f"MLflow returned {local}, outside the download dir {tmp}")
        meta = {"source": source, "pinned": pinned, "tracking_uri": tracking}
        meta["path"] = str(local.relative_to(tmp.resolve()))
        (tmp / _META).write_text(json.dumps(meta))
        try:
            os.rename(tmp, entry)
        except OSError:  # another process renamed its copy into place first: use that one
            if _cached(entry) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _cached(entry)


def _cached(entry: Path) -> Path | None:
    try:
        return entry / json.loads((entry / _META).read_text())["path"]
    except (OSError, ValueError, KeyError):
        return None


def pin(source: str, registry_uri: str) -> str:
    """``models:/name@alias``, ``models:/name/latest`` or ``models:/name/<stage>`` -> the version
    they point at now (``models:/name/<version>``); anything else is returned unchanged."""
    m = _MOVABLE.match(source)
    if m is None or (m["ref"] or "").isdigit():
        return source
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=registry_uri, registry_uri=registry_uri)
    name = m["name"]
    if m["alias"]:
        version = client.get_model_version_by_alias(name, m["alias"]).version
    else:
        ref = m["ref"].lower()
        found = client.search_model_versions("name='{}'".format(name.replace("'", "\\'")))
        found = [v for v in found if ref == "latest" or (v.current_stage or "").lower() == ref]
        if not found:
            raise LookupError(f"no version of {name!r} matches {m['ref']!r}")
        version = max(int(v.version) for v in found)
    return f"models:/{name}/{version}{m['rest'] or ''}"
