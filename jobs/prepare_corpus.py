"""Build a tokenized, packed dataset (pretraining or SFT) with the Ray Data corpus pipeline.

    python jobs/prepare_corpus.py --config jobs/configs/corpus_tiny.yaml --set output_dir=data/tiny
    ray job submit --working-dir . -- python jobs/prepare_corpus.py --config jobs/configs/sft_tiny.yaml

Re-running with the same config over unchanged inputs is a no-op; the output appears only when complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "platform"))  # run from a checkout

from diffmoe.config import ConfigError, add_config_args, load  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(parser)
    parser.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)

    from diffmoe.data import CorpusConfig, DatasetError, InputError, TokenizerError, prepare, summary

    try:
        cfg = load(CorpusConfig, args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.show_config:
        print(cfg.model_dump_json(indent=2))
        return 0

    import ray

    if not ray.is_initialized():
        ray.init()  # joins the cluster under `ray job submit` / RAY_ADDRESS, else starts a local one
    try:
        manifest = prepare(cfg, log=lambda msg: print(msg, flush=True))
    except (InputError, DatasetError, TokenizerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(summary(manifest))
    print(f"output: {Path(cfg.output_dir).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
