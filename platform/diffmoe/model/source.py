"""Resolve a model source to a local Hugging Face directory, and load the model and tokenizer.

Sources: a local directory, or an MLflow URI (``runs:/<run_id>/model``, ``models:/<name>/<version>``,
any other ``scheme:/`` MLflow understands) downloaded with ``mlflow.artifacts.download_artifacts``.
Each replica (and each expert-parallel worker, evaluation task, benchmark) resolves the source
itself, so no shared filesystem is needed when the tracking server holds the artifacts; downloads go
through a per-node cache keyed by URI (``artifact_cache``), so they happen once per node.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .artifact_cache import download, pin


class ModelSourceError(ValueError):
    """The model source cannot be resolved to a directory with a model."""


def is_mlflow_uri(source: str) -> bool:
    """``runs:/..``, ``models:/..``, ``s3://..``: a scheme of two or more letters (not a local path)."""
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+:/", source) is not None and not Path(source).exists()


def pin_version(source: str, tracking_uri: str | None = None) -> str:
    """A registry reference that can move (``models:/name@alias``, ``/latest``) -> the version it
    points at now (``models:/name/<version>``); other sources unchanged. Serve pins when it builds
    the application, so every replica (autoscaled ones too) serves one version, and rebuilding it
    after an alias moved (``serve.run`` / ``run_app``) rolls the replicas over to the new one;
    ``serve deploy`` of an unchanged YAML is a no-op in Serve (it compares configs)."""
    if not is_mlflow_uri(source):
        return source
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        return pin(source, mlflow.get_registry_uri())
    except Exception as err:  # MLflow raises many types; name the source
        raise ModelSourceError(f"cannot resolve model {source!r} in the MLflow registry: {err}") from err


def resolve(source: str, tracking_uri: str | None = None) -> Path:
    """Local path of ``source`` (downloaded once per node when it is an MLflow URI)."""
    if is_mlflow_uri(source):
        try:
            return download(source, tracking_uri)
        except Exception as err:  # MLflow raises many types; name the source
            raise ModelSourceError(f"cannot download model {source!r} from MLflow: {err}") from err
    path = Path(os.path.expanduser(source))
    if not path.is_dir():
        raise ModelSourceError(f"model directory not found: {path}")
    return path


def load_model(path: Path, device: str | None = None):
    """Default loader: the family's model (``LLaDA2MoeModelLM`` for model_type "llada2_moe", else
    ``LLaDAMoEModelLM``) in eval mode; on the GPU (bf16) when
    this process was given one, else on the CPU in fp32."""
    import json

    import torch

    from .llada2 import LLaDA2MoeModelLM
    from .modeling import LLaDAMoEModelLM  # the package __init__ (Auto-class registration) has run

    if not (path / "config.json").is_file():
        raise ModelSourceError(f"{path} has no config.json (not a Hugging Face model directory)")
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ModelSourceError(f"{path / 'config.json'}: not a JSON object: {err}") from None
    cls = LLaDA2MoeModelLM if model_type == "llada2_moe" else LLaDAMoEModelLM
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return cls.from_pretrained(str(path), dtype=dtype).to(device).eval()
