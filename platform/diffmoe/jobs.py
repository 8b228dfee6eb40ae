"""One runner for every script in ``jobs/``: command line, validation, exit code, result line.

``run_job(ConfigCls, fn)`` parses ``--config FILE`` and repeatable ``--set key=value``, builds and
validates the config (plus the job's own ``check``) before ``fn`` runs, so a bad value fails in
seconds and before any Ray cluster, MLflow run or GPU is claimed. Exit codes (documented in the
README):

- 0: the job finished;
- 2: bad configuration or input (unknown key, wrong type, missing dataset, tokenizer mismatch,
  unknown flag): fix the command, rerunning it unchanged fails again;
- 1: the job failed while running (a crash, a lost worker, an exhausted retry budget).

``--show-config`` prints the resolved, validated config as JSON and exits 0 (no result line).
Every other run that gets past ``--help`` prints exactly one result line on stdout, last:
``DIFFMOE_RESULT {"ok": true, ...}`` with the job's result, or ``{"ok": false, "exit_code": N,
"error": "..."}``, so ``ray job logs`` / ``JobSubmissionClient.get_job_logs`` can be read by a
program. Imports no Ray: ``--help`` and validation work without a cluster.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from diffmoe.config import ConfigError, StrictModel, add_config_args, load

T = TypeVar("T", bound=StrictModel)

RESULT_PREFIX = "DIFFMOE_RESULT "
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class JobInputError(ValueError):
    """Bad input that only the job itself can see (exit code 2); the message names it."""


def result_line(payload: dict[str, Any]) -> str:
    return RESULT_PREFIX + json.dumps(payload, default=str)


def parse_result(text: str) -> dict[str, Any] | None:
    """The last result line in a job's output (e.g. its ``ray job logs``), or None."""
    for line in reversed(text.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    return None


def _finish(code: int, payload: dict[str, Any]) -> int:
    sys.stdout.flush()
    print(result_line(payload), flush=True)
    return code


def _fail(code: int, err: BaseException | str) -> int:
    message = str(err)
    print(f"error: {message}", file=sys.stderr, flush=True)
    return _finish(code, {"ok": False, "exit_code": code, "error": message})


def run_job(
    config_cls: type[T],
    fn: Callable[[T, argparse.Namespace], dict[str, Any] | None],
    *,
    description: str | None = None,
    argv: list[str] | None = None,
    default_config: str | None = None,
    check: Callable[[T], None] | None = None,
    input_errors: tuple[type[BaseException], ...] = (),
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """Run one job; returns its exit code (the script passes it to ``sys.exit``).

    ``check(cfg)`` adds the job's own validation (raise ``ConfigError`` / ``JobInputError``);
    ``input_errors`` are the job's exception types that mean bad input (exit 2) when ``fn``
    raises them; anything else ``fn`` raises is a runtime failure (exit 1, traceback on stderr).
    ``fn`` returns the result dict; returning None reports ``{"ok": true}`` alone.
    """
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(parser, default=default_config)
    parser.add_argument(
        "--show-config", action="store_true", help="print the resolved, validated config as JSON and exit"
    )
    if add_args:
        add_args(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, argparse printed why)
        if exc.code in (0, None):
            return EXIT_OK
        return _finish(EXIT_BAD_INPUT, {"ok": False, "exit_code": EXIT_BAD_INPUT, "error": "bad arguments"})
    bad_input = (ConfigError, JobInputError, *input_errors)
    try:
        cfg = load(config_cls, args.config, args.overrides)
        if check:
            check(cfg)
    except bad_input as err:
        return _fail(EXIT_BAD_INPUT, err)
    if args.show_config:  # a query, not a run: plain JSON on stdout, for piping
        print(cfg.model_dump_json(indent=2))
        return EXIT_OK
    try:
        result = fn(cfg, args)
    except bad_input as err:
        return _fail(EXIT_BAD_INPUT, err)
    except KeyboardInterrupt:
        return _fail(EXIT_FAILED, "interrupted")
    except Exception as err:  # the policy: every other failure is exit 1
        traceback.print_exc()
        return _fail(EXIT_FAILED, f"{type(err).__name__}: {err}")
    return _finish(EXIT_OK, {"ok": True, **(result or {})})
