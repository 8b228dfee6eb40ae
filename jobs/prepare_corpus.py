"""Build a tokenized, packed dataset (pretraining or SFT) with the Ray Data corpus pipeline.

    python jobs/prepare_corpus.py --config jobs/configs/corpus_tiny.yaml --set output_dir=data/tiny
    ray job submit --working-dir . -- python jobs/prepare_corpus.py --config jobs/configs/sft_tiny.yaml

Re-running with the same config over unchanged inputs is a no-op; the output appears only when complete.
Last line: DIFFMOE_RESULT {"ok", "output_dir", "kind", "sequences", ...}; exit codes as in the README.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "platform"))  # run from a checkout

from diffmoe.data import CorpusConfig, DatasetError, InputError, TokenizerError  # noqa: E402
from diffmoe.jobs import run_job  # noqa: E402


def prepare_job(cfg: CorpusConfig, args) -> dict | None:
    from diffmoe.data import prepare, summary

    manifest = prepare(cfg, log=lambda msg: print(msg, flush=True))  # joins or starts Ray itself
    print(summary(manifest))
    out = Path(cfg.output_dir).resolve()
    print(f"output: {out}")
    return {"output_dir": str(out), "kind": manifest.kind, "sequences": manifest.counts.sequences}


def main(argv: list[str] | None = None) -> int:
    return run_job(
        CorpusConfig,
        prepare_job,
        description=__doc__,
        argv=argv,
        input_errors=(InputError, DatasetError, TokenizerError),
    )


if __name__ == "__main__":
    sys.exit(main())
