"""guidellm (a load tool we did not write) against a running diffmoe endpoint, report beside ours.

    make guidellm                       # against the demo server (make demo), default settings
    .venv-guidellm/bin/python benchmarks/guidellm_sweep.py --target http://127.0.0.1:8000 \\
        --model diffmoe-tiny --tokenizer artifacts/finetune-tiny --streams 1,4,16

Runs guidellm's OpenAI HTTP backend (streaming, usage) with a closed-loop concurrency sweep over
synthetic prompts, and stores guidellm's own JSON report in docs/benchmarks/guidellm/ with the
command that made it, so our figures (docs/benchmarks/serve.json) can be checked with its numbers.
guidellm lives in its own virtualenv (``make guidellm`` builds .venv-guidellm): its pins differ
from Ray's. It needs the server's API key in $DIFFMOE_API_KEY when the server has one.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="diffmoe-tiny", help="the served model name")
    p.add_argument(
        "--tokenizer", default="artifacts/finetune-tiny", help="a directory with the model's tokenizer"
    )
    p.add_argument("--streams", default="1,4,16", help="concurrency levels of the sweep")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=32, help="requests per level")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "guidellm"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = out / f"guidellm_{time.strftime('%Y%m%d')}.json"
    backend = f"kind=openai_http,target={args.target},model={args.model}"
    if os.environ.get("DIFFMOE_API_KEY"):
        backend += f",api_key={os.environ['DIFFMOE_API_KEY']}"
    cmd = [
        str(Path(sys.executable).with_name("guidellm")),
        "run",
        "--backend", backend,
        "--tokenizer", f"kind=huggingface_auto,model={args.tokenizer}",
        "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.output_tokens}",
        "--profile", "kind=concurrent",
        "--override", "profile.streams", args.streams,
        "--constraint", f"kind=max_requests,count={args.requests}",
        "--output", f"kind=json,path={report}",
        "--disable-progress",
    ]  # fmt: skip
    shown = " ".join(shlex.quote(c) for c in cmd).replace(os.environ.get("DIFFMOE_API_KEY") or "\0", "$KEY")
    print(shown, flush=True)
    rc = subprocess.call(cmd, cwd=ROOT)
    if rc == 0:
        (out / "README.md").write_text(
            "guidellm's own reports against a diffmoe endpoint (benchmarks/guidellm_sweep.py).\n\n"
            f"Latest: `{report.name}`, made by\n\n```\n{shown}\n```\n"
        )
    return rc


if __name__ == "__main__":
    sys.exit(main())
