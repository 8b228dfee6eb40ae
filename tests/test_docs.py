"""The generated docs pages are current, and every relative link in the docs points to a file."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("generator", ["gen_config_reference", "gen_benchmarks_page"])
def test_generated_page_is_current(generator, capsys):
    module = _load(generator)
    rc = module.main(["--check"])
    assert rc == 0, f"{capsys.readouterr().err.strip()}"


def test_config_reference_lists_every_field():
    page = (DOCS / "configuration.md").read_text()
    for key in ("`deepspeed.ep_size`", "`scaling.num_workers`", "`decoding.threshold`", "`tokenizer.path`"):
        assert key in page
    assert "| `decoding.gen_length` | int (>= 1) | `64` |" in page  # the server's default, not 128


def test_benchmarks_page_handles_new_files(tmp_path, monkeypatch):
    module = _load("gen_benchmarks_page")
    (tmp_path / "dllm_vs_ar.json").write_text(
        json.dumps(
            {
                "benchmark": "dllm_vs_ar",
                "machine": {"cpu": "x", "cores": 2, "gpu": None},
                "baseline": "AR twin",
                "ratio": 0.5,
                "target": ">= 1.0",
                "target_ratio": 1.0,
                "checks": {"zero_errors": True},
                "met": False,
                "details": {"why_slower": "because", "gpu": {"device": "H200", "tokens_per_s": 1234.5}},
                "date": "2026-01-01",
            }
        )
    )
    (tmp_path / "broken.json").write_text("{not json")
    monkeypatch.setattr(module, "BENCH_DIR", tmp_path)
    page = module.render()
    assert "| [dllm_vs_ar](#dllm_vs_ar) | AR twin | 0.5 | >= 1 | **not met** | >= 1.0 |" in page
    assert "`zero_errors`: true" in page
    assert "> **why_slower**: because" in page
    assert "GPU figures" in page and "H200" in page
    assert "## broken" in page and "unreadable json" in page


def test_benchmark_files_carry_a_met_consistent_with_their_measurement():
    """Every ratio is ours / baseline, higher is better: met == ratio >= target_ratio and all checks."""
    files = sorted((DOCS / "benchmarks").glob("*.json"))
    assert files
    for path in files:
        data = json.loads(path.read_text())
        ratio, target, checks, met = (data.get(k) for k in ("ratio", "target_ratio", "checks", "met"))
        assert isinstance(ratio, int | float) and not isinstance(ratio, bool), path.name
        assert isinstance(target, int | float) and not isinstance(target, bool) and target > 0, path.name
        assert isinstance(met, bool), path.name
        assert isinstance(checks, dict) and all(isinstance(v, bool) for v in checks.values()), path.name
        assert met == (ratio >= target and all(checks.values())), path.name


def test_benchmark_writer_computes_met_from_the_measurement(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "benchmarks" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    monkeypatch.setattr(common, "OUT_DIR", tmp_path)
    monkeypatch.setattr(common, "machine", lambda: {"cpu": "test"})
    cases = [(3.2, {}, True), (2.99996, {}, True), (2.9, {}, False), (3.5, {"ok": False}, False)]
    for ratio, checks, met in cases:  # 2.99996 is stored as 3.0: met agrees with the stored ratio
        path = common.write_result(
            "x",
            command="c",
            baseline="b",
            ratio=ratio,
            target=">= 3",
            target_ratio=3,
            details={},
            checks=checks,
        )
        body = json.loads(path.read_text())
        assert body["met"] is met and body["target_ratio"] == 3.0 and body["checks"] == checks
    assert (
        common.write_result(
            "x", command="c", baseline="b", ratio=float("nan"), target="t", target_ratio=1, details={}
        )
        .read_text()
        .count('"met": false')
        == 1
    )


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _links(text: str) -> list[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code
    return LINK.findall(text)


def test_relative_links_resolve():
    pages = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]
    broken = []
    for page in pages:
        for target in _links(page.read_text()):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # external URL, mailto, or an anchor on the same page
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)
