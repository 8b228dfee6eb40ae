"""Each expert-parallel rank allocates only its share, and weights go in and out shard by shard."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("rank_share_worker.py")


def _run(*args: str, tmp_path: Path) -> Path:
    out = tmp_path / f"out-{'-'.join(args)}.json"
    proc = subprocess.run(
        [sys.executable, str(WORKER), *args, str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_a_rank_allocates_its_share_of_experts_and_starts_from_the_same_weights(tmp_path):
    one, *shares = json.loads(_run("fake", "1:0,2:0,2:1,4:0,4:3", tmp_path=tmp_path).read_text())
    one_experts = [k for k in one["keys"] if ".mlp.experts." in k]
    for share in shares:
        world = share["world"]
        assert share["expert_bytes"] * world == one["expert_bytes"], share["world"]
        assert share["dense_bytes"] == one["dense_bytes"]
        # the seeded init does not depend on EP size or rank: each share is a slice of EP 1's
        assert share["equal_to_plain_init"], (world, share["rank"])
        experts = [k for k in share["keys"] if ".mlp.experts." in k]
        assert len(experts) * world == len(one_experts)
    assert one["equal_to_plain_init"]


@pytest.mark.timeout(300)
def test_two_gloo_ranks_load_shard_by_shard_and_stream_back_the_published_state(tmp_path):
    assert _run("gloo", "2", tmp_path=tmp_path).read_text() == "ok"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ep", [2, 1])
def test_zero2_steps_on_two_ranks_equal_one_model_trained_on_both_batches(tmp_path, ep):
    """DeepSpeed's ZeRO-2 reduction, clipping and AdamW over our expert-parallel layers, with the
    loop's parameter groups: at EP 2 an expert's gradient stays on its rank, at EP 1 it is averaged."""
    out = tmp_path / f"zero-ep{ep}.json"
    worker = Path(__file__).with_name("zero_worker.py")
    proc = subprocess.run(
        [sys.executable, str(worker), str(ep), str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["clipped_steps"] >= 1  # clipping was in play
    assert result["worst"] < 1e-3, result
