"""Generate docs/benchmarks.md from docs/benchmarks/*.json (and the PNGs beside them).

    python docs/gen_benchmarks_page.py          # rewrite docs/benchmarks.md
    python docs/gen_benchmarks_page.py --check  # exit 1 if docs/benchmarks.md is stale

Every ``docs/benchmarks/<name>.json`` written by ``benchmarks/*.py`` (``benchmark``, ``machine``,
``command``, ``baseline``, ``ratio``, ``target``, ``target_ratio``, ``checks``, ``met``, ``details``,
``date``) becomes one summary row and one section; a new file (e.g. ``dllm_vs_ar.json``) appears
after the next run of this script. Whether a target is met is the ``met`` the benchmark computed from
its measurement (``ratio >= target_ratio`` and every entry of ``checks``); this page never decides it
from the prose ``target``. A file without a boolean ``met`` shows "n/a". The reason a benchmark
records for a miss (``details.why*``, ``details.reason*``, ``details.note``) is quoted. A
``details.gpu`` object is rendered as its own table. GPU runs keep their own files,
``docs/benchmarks/gpu/*.json`` (with their own ``date`` and ``command``), listed at the end as they are.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # docgen, when loaded by path
from docgen import generate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "docs" / "benchmarks"
OUTPUT = ROOT / "docs" / "benchmarks.md"
GENERATOR = "docs/gen_benchmarks_page.py"
LONG_LIST = 8  # longer lists of numbers are summarised (count, min, max)


def load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return {"benchmark": path.stem, "details": {"error": f"unreadable json: {err}"}}
    return data if isinstance(data, dict) else {"benchmark": path.stem, "details": {"value": data}}


def num(value) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.4g}"
        return f"{value:.3g}"
    return str(value)


def cell(value) -> str:
    if isinstance(value, str):
        text = value
    elif (
        isinstance(value, list) and all(isinstance(v, int | float) for v in value) and len(value) > LONG_LIST
    ):
        text = f"{len(value)} values, {num(min(value))} .. {num(max(value))}"
    elif isinstance(value, list) and len(value) > LONG_LIST:
        text = f"{len(value)} entries, first {cell(value[0])}, last {cell(value[-1])}"
    elif isinstance(value, list) and all(not isinstance(v, list | dict) for v in value):
        text = "[" + ", ".join(num(v) for v in value) + "]"
    elif isinstance(value, dict) and all(not isinstance(v, list | dict) for v in value.values()):
        text = ", ".join(f"{k}: {num(v)}" for k, v in value.items())
    elif isinstance(value, list | dict):
        text = json.dumps(value, separators=(", ", ": "))
        if len(text) > 160:
            text = text[:157] + "..."
    else:
        text = num(value)
    return text.replace("|", "\\|").replace("\n", " ")


def target_met(data: dict) -> str:
    """ "met" | "not met" from the json's own ``met``; "n/a" when it has none."""
    met = data.get("met")
    return ("met" if met else "not met") if isinstance(met, bool) else "n/a"


def target_ratio(data: dict) -> str:
    value = data.get("target_ratio")
    return f">= {num(value)}" if isinstance(value, int | float) and not isinstance(value, bool) else "—"


def reasons(details: dict) -> list[tuple[str, str]]:
    keys = [k for k in details if re.match(r"^(why|reason)", k) or k in ("note", "allocator_note")]
    return [(k, details[k]) for k in keys if isinstance(details[k], str)]


def machine(data: dict) -> str:
    m = data.get("machine")
    if not isinstance(m, dict):
        return cell(m) if m else "—"
    parts = [m.get("gpu") or m.get("cpu"), f"{m['cores']} cores" if m.get("cores") else None]
    parts.append(f"torch {m['torch']}" if m.get("torch") else None)
    return ", ".join(str(p) for p in parts if p) or "—"


def flatten(obj, prefix: str = "") -> dict:
    out: dict = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = obj
    return out


def record_table(items: list[dict]) -> list[str]:
    """A list of flat-ish dicts (levels, methods) as one table of their scalar columns."""
    flat = [flatten(it) for it in items]
    cols: list[str] = []
    for row in flat:
        for k, v in row.items():
            if k not in cols and not isinstance(v, list):
                cols.append(k)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in flat]
    return lines


def is_records(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def details_section(details: dict) -> list[str]:
    """Scalars and small values as one key/value table; lists of records as their own tables.
    ``all_passes`` (every repeat of a multi-pass run) is left out: the json keeps it."""
    skip = {k for k, _ in reasons(details)} | {"gpu", "plot", "all_passes"}
    lines = ["| detail | value |", "|---|---|"]
    tables: list[tuple[str, list]] = []

    def emit(key: str, value) -> None:
        if is_records(value):
            tables.append((key, value))
        elif isinstance(value, dict) and any(isinstance(v, dict) or is_records(v) for v in value.values()):
            for sub, v in value.items():
                emit(f"{key}.{sub}", v)
        else:
            lines.append(f"| `{key}` | {cell(value)} |")

    for key, value in details.items():
        if key not in skip:
            emit(key, value)
    out = lines + [""]
    for key, records in tables:
        out += [f"`{key}`:", "", *record_table(records), ""]
    return out


def gpu_section(gpu) -> list[str]:
    lines = ["GPU figures (`details.gpu`):", "", "| measurement | value |", "|---|---|"]
    lines += [f"| `{k}` | {cell(v)} |" for k, v in flatten(gpu).items()]
    return lines + [""]


def render() -> str:
    files = sorted(BENCH_DIR.glob("*.json"))
    benches = [(f, load(f)) for f in files]
    lines = [
        "# Benchmarks",
        "",
        f"<!-- Generated by {GENERATOR} from docs/benchmarks/*.json. Do not edit by hand: run",
        f"     `.venv/bin/python {GENERATOR}` after `make bench`; tests/test_docs.py fails when stale. -->",
        "",
        "Each benchmark compares the platform with a named baseline on the same machine and records "
        "`ratio` = ours / baseline against a `target_ratio` (plus, for some, other measured conditions "
        "in `checks`); `met` is computed by the benchmark from what it measured. `make bench` "
        "(`benchmarks/run.py`) rewrites the json files; this page is regenerated from them. The CPU figures come from a 2-core machine "
        "shared with other work, so they are noisy; each json keeps every run, not only the best. "
        "Single-GPU figures for the 7B-A1B shapes are in [gpu_cluster.md](gpu_cluster.md#4-measured-on-one-h200).",
        "",
        "| benchmark | baseline | ratio | target ratio | met? | target | machine | date |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f, data in benches:
        verdict = target_met(data)
        name = data.get("benchmark") or f.stem
        lines.append(
            f"| [{cell(name)}](#{slug(name)}) | {cell(data.get('baseline', '—'))} | "
            f"{cell(data.get('ratio', '—'))} | {target_ratio(data)} | **{verdict}** | "
            f"{cell(data.get('target', '—'))} | {machine(data)} | {cell(data.get('date', '—'))} |"
        )
    lines.append("")
    shown: set[str] = set()
    for f, data in benches:
        name = str(data.get("benchmark") or f.stem)
        details = data.get("details") if isinstance(data.get("details"), dict) else {}
        verdict = target_met(data)
        lines += [f"## {name}", "", f"Source: [`docs/benchmarks/{f.name}`](benchmarks/{f.name})", ""]
        if data.get("command"):
            lines += ["```bash", str(data["command"]), "```", ""]
        lines.append(f"- baseline: {cell(data.get('baseline', '—'))}")
        lines.append(f"- ratio: **{cell(data.get('ratio', '—'))}**, target ratio: {target_ratio(data)}")
        lines.append(f"- target: {cell(data.get('target', '—'))}")
        checks = data.get("checks")
        if isinstance(checks, dict) and checks:
            lines.append("- other conditions: " + ", ".join(f"`{k}`: {num(v)}" for k, v in checks.items()))
        how = (
            "`met` in the json: ratio >= target ratio and every condition" if verdict != "n/a" else "no `met`"
        )
        lines.append(f"- target **{verdict}** ({how})")
        why = reasons(details)
        if verdict == "not met" and not any(k.startswith(("why", "reason")) for k, _ in why):
            lines.append("- no reason for the miss is recorded in the json")
        lines.append("")
        for key, text in why:
            lines += [f"> **{key}**: {text}", ""]
        plots = [Path(details["plot"]).name] if isinstance(details.get("plot"), str) else []
        plots += [p.name for p in sorted(BENCH_DIR.glob(f"{f.stem}*.png"))]
        for plot in dict.fromkeys(plots):
            if (BENCH_DIR / plot).is_file():
                shown.add(plot)
                lines += [f"![{name}](benchmarks/{plot})", ""]
        if details:
            lines += details_section(details)
        if isinstance(details.get("gpu"), dict):
            lines += gpu_section(details["gpu"])
    for f in sorted((BENCH_DIR / "gpu").glob("*.json")):
        data = load(f)
        lines += [
            f"## GPU: {f.stem}",
            "",
            f"Source: [`docs/benchmarks/gpu/{f.name}`](benchmarks/gpu/{f.name})",
            "",
        ]
        lines.append(f"- date: {cell(data.get('date', 'not recorded in the file'))}")
        lines += [f"- command: `{data['command']}`" if data.get("command") else "- command: not recorded", ""]
        rest = {k: v for k, v in data.items() if k not in ("date", "command")}
        lines += ["| measurement | value |", "|---|---|"]
        lines += [f"| `{k}` | {cell(v)} |" for k, v in flatten(rest).items()] + [""]
    extra = [p for p in sorted(BENCH_DIR.glob("*.png")) if p.name not in shown]
    if extra:
        lines += ["## Other plots", ""]
        for p in extra:
            lines += [f"![{p.stem}](benchmarks/{p.name})", ""]
    return "\n".join(lines).rstrip() + "\n"


def slug(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", str(title).lower()).replace(" ", "-")


def main(argv: list[str] | None = None) -> int:
    return generate(render, OUTPUT, GENERATOR, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
