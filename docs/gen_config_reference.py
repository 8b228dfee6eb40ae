"""Generate docs/configuration.md from the typed config models, so the reference cannot drift.

    python docs/gen_config_reference.py          # rewrite docs/configuration.md
    python docs/gen_config_reference.py --check  # exit 1 if docs/configuration.md is stale

Each model is expanded into dotted keys (nested sections recurse, using the parent's actual default
instance, so e.g. ``decoding.*`` under ``ServeConfig`` shows the server's defaults, not
``DecodingConfig``'s). A key's description is the pydantic ``description`` when there is one, else
the ``# comment`` at the end of the field's source lines, else the comment block right above it.
"""

from __future__ import annotations

import ast
import inspect
import io
import json
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # docgen, when loaded by path
from docgen import generate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "platform"))  # run from a checkout without installing

from pydantic import BaseModel  # noqa: E402
from pydantic_core import PydanticUndefined  # noqa: E402

OUTPUT = ROOT / "docs" / "configuration.md"
GENERATOR = "docs/gen_config_reference.py"


def sections() -> list[dict]:
    """The documented models, in page order (imported lazily: torch comes with them)."""
    from diffmoe.data.config import CorpusConfig
    from diffmoe.evaluate import EvalConfig
    from diffmoe.generation.config import DecodingConfig
    from diffmoe.harness.job import LmEvalConfig
    from diffmoe.serve.config import ServeConfig
    from diffmoe.train.config import TrainJobConfig

    return [
        {
            "title": "Corpus preparation",
            "model": CorpusConfig,
            "used_by": "`jobs/prepare_corpus.py --config jobs/configs/corpus*.yaml | sft_tiny.yaml`",
        },
        {
            "title": "Training (pretraining, SFT and AR -> diffusion conversion)",
            "model": TrainJobConfig,
            "used_by": "`jobs/pretrain.py`, `jobs/finetune.py` and `jobs/convert.py` with "
            "`jobs/configs/pretrain_*.yaml`, `finetune_tiny.yaml`, `convert_tiny.yaml`",
        },
        {
            "title": "Evaluation",
            "model": EvalConfig,
            "used_by": "`jobs/evaluate.py --config jobs/configs/evaluate_tiny.yaml`",
        },
        {
            "title": "lm-evaluation-harness",
            "model": LmEvalConfig,
            "used_by": "`jobs/lm_eval.py --config jobs/configs/lm_eval_tiny.yaml` (extra `lm-eval`)",
        },
        {
            "title": "Serving",
            "model": ServeConfig,
            "used_by": "the `args` block of `deployments/diffmoe.yaml` (`diffmoe.serve.app:build_app`)",
        },
        {
            "title": "Decoding",
            "model": DecodingConfig,
            "used_by": "`diffmoe.generation.generate`, `Engine`, and `decoding` in `ServeConfig` "
            "(requests override some keys, see [api.md](api.md))",
        },
    ]


# ---- descriptions from source comments -------------------------------------------------------------
def field_comments(cls: type) -> dict[str, str]:
    """{field: comment} from ``cls``'s own source: trailing comment on the field's lines, else the
    comment lines directly above it."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    out: dict[str, str] = {}
    body = ast.parse(source).body[0].body
    for node in body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        trailing = [
            comments[n]
            for n in range(node.lineno, node.end_lineno + 1)
            if n in comments and not lines[n - 1].lstrip().startswith("#")
        ]
        if trailing:
            out[node.target.id] = " ".join(trailing)
            continue
        above, n = [], node.lineno - 1
        while n >= 1 and lines[n - 1].lstrip().startswith("#"):
            above.insert(0, comments.get(n, ""))
            n -= 1
        if above:
            out[node.target.id] = " ".join(above)
    return out


def describe(cls: type, name: str, info) -> str:
    if info.description:
        return info.description
    for klass in cls.__mro__:  # a field may be declared on a base class
        if (
            isinstance(klass, type)
            and issubclass(klass, BaseModel)
            and name in klass.__dict__.get("__annotations__", {})
        ):
            return field_comments(klass).get(name, "")
    return ""


# ---- types and defaults ---------------------------------------------------------------------------
def fmt_type(ann) -> str:
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if ann is type(None):
        return "null"
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(fmt_type(a) for a in args)
    if origin in (list, tuple, dict, set):
        inner = ", ".join("..." if a is Ellipsis else fmt_type(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    if ann is typing.Any:
        return "any"
    return getattr(ann, "__name__", str(ann))


def fmt_constraints(info) -> str:
    marks = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "len >=", "max_length": "len <="}
    parts = []
    for meta in info.metadata:
        for attr, sign in marks.items():
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sign} {value}")
    return ", ".join(parts)


def fmt_default(value) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    if isinstance(value, list | tuple | dict):
        return f"`{json.dumps(list(value) if isinstance(value, tuple) else value)}`"
    return f"`{value}`"


def nested_model(ann) -> type | None:
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def rows(cls: type, default: BaseModel | None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) for every field, nested sections expanded."""
    out = []
    for name, info in cls.model_fields.items():
        if default is not None:
            value = getattr(default, name)
        elif info.default is not PydanticUndefined:
            value = info.default
        elif info.default_factory is not None:
            value = info.default_factory()
        else:
            value = PydanticUndefined
        sub = nested_model(info.annotation)
        key = prefix + name
        if sub is not None:
            out.extend(rows(sub, value if isinstance(value, BaseModel) else None, key + "."))
            continue
        kind = fmt_type(info.annotation)
        limits = fmt_constraints(info)
        if limits:
            kind += f" ({limits})"
        shown = "required" if value is PydanticUndefined else fmt_default(value)
        text = describe(cls, name, info).replace("|", "\\|")
        out.append((f"`{key}`", kind, shown, text))
    return out


def section_docs(cls: type, prefix: str = "") -> list[str]:
    """``- `key`: docstring`` for each nested section that has a docstring of its own."""
    out = []
    for name, info in cls.model_fields.items():
        sub = nested_model(info.annotation)
        if sub is None:
            continue
        doc = first_paragraph(sub.__dict__.get("__doc__"))
        if doc:
            out.append(f"- `{prefix}{name}` ({sub.__name__}): {doc}")
        out.extend(section_docs(sub, f"{prefix}{name}."))
    return out


def first_paragraph(text: str | None) -> str:
    if not text:
        return ""
    return " ".join(inspect.cleandoc(text).split("\n\n")[0].split())


def render() -> str:
    import diffmoe.config

    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated by {GENERATOR} from the typed config models. Do not edit by hand: run",
        f"     `.venv/bin/python {GENERATOR}`; tests/test_docs.py fails when this file is stale. -->",
        "",
        " ".join(inspect.getdoc(diffmoe.config).split("\n\n")[1].split()),
        "",
        "Every job takes `--config FILE` and any number of `--set dotted.key=value` overrides; values "
        "are parsed as YAML scalars (`--set scaling.num_workers=[2,4]`, `--set model.init_from=null`). "
        "Unknown keys and wrong types fail before any cluster resource is claimed, with the dotted key "
        "named. Every job's `--show-config` prints its resolved, validated config as JSON and exits.",
        "",
        "Columns: the dotted key as written in YAML or `--set`; its type (with bounds); the default when "
        "the key is absent; the description from the model's source.",
        "",
    ]
    for section in sections():
        cls = section["model"]
        module = sys.modules[cls.__module__]
        path = Path(module.__file__).resolve().relative_to(ROOT)
        lines += [f"## {section['title']}: `{cls.__name__}`", ""]
        lines.append(f"Source: [`{path.as_posix()}`](../{path.as_posix()}). Used by {section['used_by']}.")
        lines.append("")
        doc = first_paragraph(cls.__dict__.get("__doc__"))
        if doc:
            lines += [doc, ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        lines += [f"| {k} | {t} | {d} | {text} |" for k, t, d, text in rows(cls, None)]
        lines.append("")
        nested = section_docs(cls)
        if nested:
            lines += ["Sections:", "", *nested, ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    return generate(render, OUTPUT, GENERATOR, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
