"""Model sources against a real MLflow SQLite store: run and registry URIs resolve, downloads are
cached once per URI (atomically, also under concurrent resolvers), moving registry references are
pinned to the version they name, and bad sources fail with the source named."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from diffmoe.model import LLaDAMoEModelLM, named_config
from diffmoe.model.artifact_cache import CACHE_ENV, cache_dir
from diffmoe.model.source import ModelSourceError, is_mlflow_uri, load_model, resolve


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    """One SQLite tracking store for the module (creating its tables takes seconds)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    return uri, MlflowClient(uri)


@pytest.fixture()
def store(database, request, tmp_path, monkeypatch):
    """An experiment with its artifacts under tmp_path, and an empty model cache."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    uri, client = database
    exp = client.create_experiment(request.node.name, artifact_location=str(tmp_path / "artifacts"))
    return uri, client, exp


def log_dir(client, exp: str, directory) -> str:
    """Log ``directory`` as the run artifact ``model``; returns the run id."""
    run = client.create_run(exp)
    client.log_artifacts(run.info.run_id, str(directory), "model")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def tiny_dir(path, seed: int):
    torch.manual_seed(seed)
    LLaDAMoEModelLM(named_config("tiny", vocab_size=64, max_position_embeddings=32)).save_pretrained(path)
    return path


def test_run_uri_downloads_once_then_reads_the_cache(store, tmp_path):
    uri, client, exp = store
    model_dir = tiny_dir(tmp_path / "tiny", seed=0)
    run_id = log_dir(client, exp, model_dir)
    source = f"runs:/{run_id}/model"
    assert is_mlflow_uri(source) and not is_mlflow_uri(str(model_dir))
    first = resolve(source, uri)
    assert first.is_relative_to(cache_dir()) and (first / "config.json").is_file()
    loaded = load_model(first, "cpu")
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, load_model(model_dir, "cpu")(ids).logits)
    # Remove the artifacts from the store: a second resolve can only succeed from the cache.
    shutil.rmtree(tmp_path / "artifacts")
    assert resolve(source, uri) == first
    assert [p.name for p in cache_dir().iterdir()] == [first.parent.name]  # one entry, no temp dirs
    with pytest.raises(ModelSourceError, match="cannot download"):  # an uncached URI does download
        resolve(f"runs:/{run_id}/other", uri)


def test_concurrent_resolvers_share_one_complete_copy(store, tmp_path):
    uri, client, exp = store
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "weights.bin").write_bytes(bytes(range(256)) * 4096)
    source = f"runs:/{log_dir(client, exp, tmp_path / 'm')}/model"
    with ThreadPoolExecutor(6) as pool:
        paths = list(pool.map(lambda _: resolve(source, uri), range(6)))
    assert len(set(paths)) == 1
    assert (paths[0] / "weights.bin").read_bytes() == (tmp_path / "m" / "weights.bin").read_bytes()
    assert len(list(cache_dir().iterdir())) == 1  # the losers' temp copies are gone


def test_registry_references_are_pinned_to_the_version_they_name(store, tmp_path):
    uri, client, exp = store
    client.create_registered_model("tiny-src")
    versions = []
    for text in ("one", "two"):
        (tmp_path / text).mkdir()
        (tmp_path / text / "config.json").write_text(text)
        run_id = log_dir(client, exp, tmp_path / text)
        source = client.get_run(run_id).info.artifact_uri + "/model"
        versions.append(client.create_model_version("tiny-src", source=source, run_id=run_id).version)
    read = lambda s: (resolve(s, uri) / "config.json").read_text()  # noqa: E731
    assert read(f"models:/tiny-src/{versions[0]}") == "one"
    assert read("models:/tiny-src/latest") == "two"
    client.set_registered_model_alias("tiny-src", "champion", versions[0])
    assert read("models:/tiny-src@champion") == "one"
    client.set_registered_model_alias("tiny-src", "champion", versions[1])
    assert read("models:/tiny-src@champion") == "two"  # the alias moved: not the cached version 1
    with pytest.raises(ModelSourceError, match="no version of 'tiny-src' matches 'Production'"):
        resolve("models:/tiny-src/Production", uri)


def test_bad_sources_name_what_is_wrong(store, tmp_path):
    uri, _, _ = store
    with pytest.raises(ModelSourceError, match="not found"):
        resolve(str(tmp_path / "missing"))
    with pytest.raises(ModelSourceError, match="cannot download model 'runs:/0123456789abcdef/model'"):
        resolve("runs:/0123456789abcdef/model", uri)
    assert not cache_dir().exists() or not list(cache_dir().iterdir())  # no partial download left
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="no config.json"):
        load_model(tmp_path / "empty")
