"""Build once, evaluate several runtime settings: the table and chart to choose a setting from.

    smash-build sweep manifests/tiny-flux.toml --vary runtime.cacher.interval=2,3,4

Runtime settings change no weights, so one artifact serves every configuration: each is the
artifact loaded with ``smash_runtime.load(..., cacher={...}, compiler={...})``. Several
``--vary`` options give their cartesian product.

    >>> from smash_build.evaluate.sweep import parse_vary, expand_configurations
    >>> expand_configurations({"cacher": {"name": "fora", "interval": 3}, "compiler": None},
    ...                       parse_vary(["runtime.cacher.interval=2,3"]))
    [RuntimeConfig(label='interval=2', ...), RuntimeConfig(label='interval=3', ...)]
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Sequence
from typing import Any

from smash_runtime.errors import SettingsError

from ..manifest import toml_value
from .runner import RuntimeConfig

_SECTIONS = ("cacher", "compiler")
NONE_WORDS = ("none", "null", "off")


def parse_value(text: str) -> Any:
    """A ``--vary`` value as TOML reads it (``2`` int, ``0.5`` float, ``true``), else the plain string."""
    text = text.strip()
    return None if text.lower() in NONE_WORDS else toml_value(text)


def parse_vary(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["runtime.cacher.interval=2,3,4"]`` -> ``{"runtime.cacher.interval": [2, 3, 4]}``."""
    out: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not values.strip():
            raise SettingsError("--vary", item, "KEY=V1,V2,... e.g. runtime.cacher.interval=2,3,4")
        if len(parts) not in (2, 3) or parts[0] != "runtime" or parts[1] not in _SECTIONS:
            raise SettingsError("--vary", key, "runtime.cacher[.PARAM] or runtime.compiler[.PARAM]",
                                hint="only runtime settings can vary without rebuilding")
        if key in out:
            raise SettingsError("--vary", key, "each key once (list all its values after '=')")
        out[key] = [parse_value(v) for v in values.split(",")]
    return out


def _label(assignment: dict[str, Any]) -> str:
    short = {k: k.split(".", 1)[1] for k in assignment}
    # "interval" alone when unambiguous, "cacher.interval" when cacher and compiler both vary
    names = [s.split(".")[-1] for s in short.values()]
    parts = []
    for key, value in assignment.items():
        name = key.split(".")[-1] if names.count(key.split(".")[-1]) == 1 else short[key]
        shown = "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        parts.append(f"{name}={shown}")
    return ", ".join(parts)


def expand_configurations(runtime: dict[str, Any], vary: dict[str, list[Any]]) -> list[RuntimeConfig]:
    """One RuntimeConfig per combination of the ``vary`` values, applied over the recorded ``runtime``.

    ``runtime.cacher=none`` switches the cacher off for that combination (its parameters then do
    not apply, so the combinations that differ only in them collapse into one); naming the
    recorded cacher keeps its recorded parameters.
    """
    configs: list[RuntimeConfig] = []
    seen: set[str] = set()
    keys = list(vary)
    for combo in itertools.product(*(vary[k] for k in keys)):
        tables = {s: copy.deepcopy(runtime.get(s)) for s in _SECTIONS}
        assignment = dict(zip(keys, combo))
        applied: dict[str, Any] = {}
        # whole-table settings first (runtime.cacher=none / =fora), then their parameters
        for key, value in sorted(assignment.items(), key=lambda kv: kv[0].count(".")):
            parts = key.split(".")
            section = parts[1]
            if len(parts) == 2:
                recorded = runtime.get(section)
                if value is None:
                    tables[section] = None
                elif not (recorded and recorded.get("name") == value):
                    tables[section] = {"name": value}
                applied[key] = value
                continue
            if tables[section] is None:
                if f"runtime.{section}" in assignment:
                    continue  # switched off in this combination: its parameters do not apply
                raise SettingsError(f"runtime.{section}.{parts[2]}", value,
                                    f"a [runtime.{section}] table to set it on; the artifact records none",
                                    hint=f"also vary runtime.{section}=NAME or set it in the manifest")
            tables[section][parts[2]] = value
            applied[key] = value
        _check(tables)
        identity = json.dumps(tables, sort_keys=True)
        if identity in seen:
            continue
        seen.add(identity)
        configs.append(RuntimeConfig(label=_label({k: applied[k] for k in keys if k in applied}),
                                     cacher=tables["cacher"] or False, compiler=tables["compiler"] or False))
    return configs


def _check(tables: dict[str, Any]) -> None:
    """Validate each table with the runtime's settings models before anything runs."""
    from smash_runtime.settings import cacher_from_dict, compiler_from_dict

    for section, parse in (("cacher", cacher_from_dict), ("compiler", compiler_from_dict)):
        if tables[section]:
            try:
                parse(tables[section])
            except SettingsError as exc:
                raise exc.with_prefix(f"runtime.{section}") from None


def sweep(manifest, vary: dict[str, list[Any]], settings, *, out_dir=None, progress: bool = True,
          include_recorded: bool = False, step=lambda message: None):
    """Build ``manifest`` once and evaluate each runtime configuration of ``vary`` against the base.

    Returns ``(build_result, evaluation)``; the artifact gets eval/ with the comparison table,
    the latency-vs-fidelity plot and a model card listing every configuration.
    """
    from ..builder import build
    from .runner import evaluate

    runtime = {"cacher": manifest.runtime.cacher, "compiler": manifest.runtime.compiler}
    configurations = expand_configurations(runtime, vary)  # validated before the (long) build
    if include_recorded:
        configurations.insert(0, RuntimeConfig(label="recorded"))
    result = build(manifest, out_dir=out_dir, step=step)
    evaluation = evaluate(result.artifact.path, settings, configurations=configurations, progress=progress)
    return result, evaluation
