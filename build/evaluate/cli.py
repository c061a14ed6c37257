"""Click commands: ``smash-build evaluate ARTIFACT`` and ``smash-build sweep MANIFEST --vary ...``.

The main CLI registers them (``main.add_command(evaluate_cmd)``, ``main.add_command(sweep_cmd)``)
and calls :func:`evaluate_after_build` for ``smash-build MANIFEST --evaluate``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from smash_runtime.errors import SettingsError, SmashError

EXIT_BAD_INPUT = 2


def _csv(kind):
    def convert(ctx, param, value):
        if value is None:
            return None
        try:
            return [kind(v.strip()) for v in value.split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"a comma-separated list of {kind.__name__} values, got {value!r}") from None

    return convert


def eval_options(func):
    """Options shared by ``evaluate`` and ``sweep``: they override the manifest's [evaluate] table."""
    options = [
        click.option("--prompts", default=None, help="'builtin' (default), a prompt file (.txt/.json/.jsonl/.csv/.tsv) "
                     "or a Hub dataset hf://datasets/ORG/NAME."),
        click.option("--num-prompts", type=int, default=None, help="Use the first N prompts (default 16)."),
        click.option("--seeds", callback=_csv(int), default=None, help="Comma-separated seeds; each prompt runs with each seed."),
        click.option("--steps", type=int, default=None, help="Denoising steps (default: the first warm-up shape, else the pipeline's)."),
        click.option("--height", type=int, default=None),
        click.option("--width", type=int, default=None),
        click.option("--guidance-scale", type=float, default=None),
        click.option("--metrics", callback=_csv(str), default=None,
                     help="Comma-separated: psnr,ssim,ms_ssim,lpips,arniqa,clip_score (learned ones need --weights-dir)."),
        click.option("--device", default=None, help="auto (default), cpu, cuda or cuda:N."),
        click.option("--warmup", type=int, default=None, help="Untimed generations per side first (default 1)."),
        click.option("--weights-dir", type=click.Path(file_okay=False), default=None,
                     help="Metric weights folder, used as TORCH_HOME and HF_HOME (offline); see docs/evaluation.md."),
        click.option("--clip-model", default=None, help="CLIP model id in the weights folder, or a local CLIP folder."),
        click.option("--samples", "num_samples", type=int, default=None, help="Sample pairs saved under eval/samples (default 4)."),
        click.option("--threads", type=int, default=None, help="torch CPU threads for both sides (default: torch's choice)."),
        click.option("--isolate/--no-isolate", default=None,
                     help="Run each side in its own process (default) so peak memory is that side's alone."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


_EVAL_KEYS = ("prompts", "num_prompts", "seeds", "steps", "height", "width", "guidance_scale", "metrics", "device",
              "warmup", "weights_dir", "clip_model", "num_samples", "isolate", "threads")


def settings_from_options(table: dict[str, Any] | None, options: dict[str, Any], base_dir: Path | None):
    from .settings import settings_from_dict

    merged = dict(table or {})
    merged.update({k: options[k] for k in _EVAL_KEYS if options.get(k) is not None})
    if options.get("weights_dir") is not None:
        merged["weights_dir"] = str(Path(options["weights_dir"]).resolve())  # a CLI path is relative to the cwd
    return settings_from_dict(merged, base_dir=base_dir)


def _fail(exc: BaseException) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(EXIT_BAD_INPUT if isinstance(exc, SettingsError) else 1)


def _finish(evaluation) -> None:
    from rich.console import Console

    from .report import print_summary

    console = Console(stderr=True)
    print_summary(evaluation.results, console)
    if evaluation.written:
        console.print(f"[bold green]evaluation[/] written to {evaluation.root / 'eval'} and {evaluation.root / 'README.md'}")


def evaluate_after_build(build_result, manifest, progress: bool = True, overrides: dict[str, Any] | None = None):
    """``smash-build MANIFEST --evaluate``: evaluate the artifact just built with the manifest's [evaluate] settings.

    ``overrides`` replaces [evaluate] keys (e.g. ``{"threads": 1}`` or options the manifest does not hold).
    """
    from .runner import evaluate
    from .settings import settings_from_dict

    base_dir = manifest.path.parent if getattr(manifest, "path", None) else None
    table = {**(getattr(manifest, "evaluate", None) or {}), **(overrides or {})}
    settings = settings_from_dict(table, base_dir=base_dir)
    evaluation = evaluate(build_result.artifact.path, settings, progress=progress)
    if progress:
        _finish(evaluation)
    return evaluation


@click.command("evaluate")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--base", "base_source", default=None,
              help="The base model: a Hub id, a diffusers folder or builtin:NAME (default: the source in smash.json).")
@click.option("--base-revision", default=None, help="Revision of a Hub base (default: the commit recorded in smash.json).")
@click.option("--base-dtype", default=None, type=click.Choice(["float32", "bfloat16", "float16"]),
              help="dtype to load the base in (default: the artifact's build dtype).")
@click.option("--manifest", "manifest_path", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Read [evaluate] settings from this manifest (options still override them).")
@click.option("--cacher/--no-cacher", default=True, help="Apply the recorded cacher to the artifact (default on).")
@click.option("--compiler/--no-compiler", default=True, help="Apply the recorded compiler to the artifact (default on).")
@eval_options
def evaluate_cmd(artifact, base_source, base_revision, base_dtype, manifest_path, cacher, compiler, **options):
    """Measure ARTIFACT against its base model: latency, memory, size, load time and image fidelity.

    Writes eval/results.json, eval/samples/, plots and the README.md model card into ARTIFACT.
    """
    from smash_runtime.format import read_record

    from .runner import BaseSpec, RuntimeConfig, evaluate

    try:
        table, base_dir = None, None
        if manifest_path:
            from ..manifest import load_manifest

            spec = load_manifest(manifest_path)
            table, base_dir = spec.evaluate, Path(manifest_path).parent
        settings = settings_from_options(table, options, base_dir)
        recorded = BaseSpec.from_record(read_record(Path(artifact))) if not base_source else None
        base = recorded or BaseSpec(base_source, base_revision, base_dtype or read_record(Path(artifact)).dtype or "float32")
        if recorded and (base_revision or base_dtype):
            base = BaseSpec(recorded.id, base_revision or recorded.revision, base_dtype or recorded.dtype)
        evaluation = evaluate(artifact, settings, base=base, configurations=[RuntimeConfig("optimized", cacher, compiler)])
    except SmashError as exc:
        _fail(exc)
    _finish(evaluation)


@click.command("sweep")
@click.argument("manifest", type=click.Path(dir_okay=False, exists=True))
@click.option("--vary", "vary_items", multiple=True, required=True,
              help="KEY=V1,V2,... over runtime settings, e.g. runtime.cacher.interval=2,3,4 (repeat for a product).")
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Artifact folder (overrides [output] dir).")
@click.option("--with-recorded", is_flag=True, help="Also evaluate the manifest's own runtime settings.")
@eval_options
def sweep_cmd(manifest, vary_items, out_dir, with_recorded, **options):
    """Build MANIFEST once and evaluate several runtime settings against the base.

    Writes the comparison table, the latency-vs-fidelity chart and the model card into the artifact.
    """
    from ..manifest import ManifestError, load_manifest
    from .sweep import parse_vary, sweep

    try:
        spec = load_manifest(manifest)
    except ManifestError as exc:
        click.echo(f"error: {manifest}: invalid manifest\n{exc}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    try:
        vary = parse_vary(vary_items)
        settings = settings_from_options(spec.evaluate, options, Path(manifest).parent)
        _, evaluation = sweep(spec, vary, settings, out_dir=out_dir, include_recorded=with_recorded,
                              step=lambda message: click.echo(message, err=True))
    except SmashError as exc:
        _fail(exc)
    _finish(evaluation)
