"""Shared fixtures: one real local Ray cluster per test session, started only when a test asks."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """Models downloaded from MLflow go to a per-session cache, not ~/.cache (set before Ray
    starts, so replicas and workers inherit it)."""
    path = tmp_path_factory.mktemp("model-cache")
    os.environ["DIFFMOE_MODEL_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def ray_cluster():
    """A real single-node Ray cluster on loopback (2 CPUs like CI), shut down at session end."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random model directory served as "tiny-served" (test_serve*.py)."""
    from diffmoe.bench.tiny_model import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("served") / "tiny-served")


@pytest.fixture(scope="session")
def replica_loop():
    """The event loop the in-process replica runs on (``serve_replica.py``)."""
    from serve_replica import event_loop_thread

    run, stop = event_loop_thread()
    yield run
    stop()


@pytest.fixture(scope="session")
def replica(tiny_model_dir):
    """``(host, metrics, app)``: one in-process replica for test_serve_robust.py / test_serve_fuzz.py."""
    from serve_replica import make_replica

    return make_replica(tiny_model_dir)


def _prepare(ray_cluster, tmp_path_factory, name: str, **settings):
    from diffmoe.data.config import CorpusConfig
    from diffmoe.data.pipeline import prepare_corpus

    out = tmp_path_factory.mktemp(name) / "data"
    cfg = CorpusConfig.model_validate({**settings, "output_dir": str(out)})
    prepare_corpus(cfg, log=lambda *a: None)
    return out


@pytest.fixture(scope="session")
def tiny_corpus(ray_cluster, tmp_path_factory):
    """A small real pretraining dataset: 60 standard-library modules, 512-token BPE, seq_len 64."""
    return _prepare(
        ray_cluster,
        tmp_path_factory,
        "corpus",
        max_documents=60,
        seq_len=64,
        validation_fraction=0.1,
        tokenizer={"train": {"vocab_size": 512, "sample_docs": 60}},
    )


@pytest.fixture(scope="session")
def tiny_sft(ray_cluster, tmp_path_factory, tiny_corpus):
    """The built-in SFT set (signature + docstring -> body) with the corpus's tokenizer."""
    return _prepare(
        ray_cluster,
        tmp_path_factory,
        "sft",
        kind="sft",
        max_documents=40,
        seq_len=128,
        validation_fraction=0.1,
        tokenizer={"path": str(tiny_corpus / "tokenizer")},
    )


def pytest_collection_modifyitems(config, items):
    """Tests marked ``run_last`` (the end-to-end demo, which stops the session's Ray) run last."""
    items.sort(key=lambda item: item.get_closest_marker("run_last") is not None)
