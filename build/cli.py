"""``smash-build``: the command line. A manifest is the whole interface.

    smash-build manifests/tiny-flux.toml            # build the artifact the manifest describes
    smash-build manifests/tiny-flux.toml -o out/    # ... somewhere else
    smash-build validate manifests/tiny-flux.toml   # check it, write nothing
    smash-build schema > smash-manifest.schema.json # JSON Schema for editors
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from smash_runtime.errors import SettingsError, SmashError
from smash_runtime.logs import quiet_third_party_logs

console = Console(stderr=True)
EXIT_BAD_INPUT = 2


class _ManifestGroup(click.Group):
    """A group whose first argument may be a manifest path: ``smash-build M.toml`` means ``build``."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["build", *args]
        return super().resolve_command(ctx, args)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fail(exc: BaseException) -> None:
    code = EXIT_BAD_INPUT if isinstance(exc, (SettingsError,)) or type(exc).__name__ == "ManifestError" else 1
    click.echo(f"error: {exc}", err=True)
    sys.exit(code)


def _load_manifest(path: str, overrides: dict | None = None):
    from .manifest import ManifestError, load_manifest

    try:
        return load_manifest(path, overrides=overrides)
    except ManifestError as exc:
        click.echo(f"error: {path}: invalid manifest\n{exc}", err=True)
        sys.exit(EXIT_BAD_INPUT)


@click.group(cls=_ManifestGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="smash-build")
def main():
    """Bake QKV fusion and quantization into a diffusion model and write a deployable artifact.

    Run `smash-build MANIFEST.toml` to build; see `smash-build COMMAND --help` for the rest.
    """
    quiet_third_party_logs()


@main.command("build")
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Artifact folder (overrides [output] dir).")
def build_cmd(manifest, out_dir):
    """Build the artifact MANIFEST describes."""
    from .builder import build

    spec = _load_manifest(manifest)
    try:
        result = _run_build(spec, out_dir)
    except SmashError as exc:
        _fail(exc)
    _print_summary(result)


def _run_build(spec, out_dir):
    """Build with a log line per phase and a bar (with ETA) over the blocks of streamed components."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .builder import build

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bars:
        tasks: dict[str, int] = {}
        current = {"name": "build"}

        def step(message: str) -> None:
            console.log(message)
            current["name"] = message

        def progress(done: int, total: int, unit: str) -> None:
            name = current["name"]
            if name not in tasks:
                tasks[name] = bars.add_task(name, total=total)
            bars.update(tasks[name], completed=done, description=f"{name}: {unit}")

        return build(spec, out_dir=out_dir, step=step, progress=progress)


def _print_summary(result) -> None:
    table = Table(title="baked", show_lines=False)
    for col in ("component", "before", "after", "ratio", "fused attn", "quantized", "excluded"):
        table.add_column(col, justify="right" if col not in ("component",) else "left")
    for c in result.changes:
        q = c.quantization
        table.add_row(
            c.name, _human(c.bytes_before), _human(c.bytes_after), f"{c.bytes_after / c.bytes_before:.2f}x",
            str(c.fused_modules), str(len(q.quantized)) if q else "-", str(len(q.excluded)) if q else "-",
        )
    console.print(table)
    art = result.artifact
    if result.streamed:
        console.print(f"streamed build, peak RSS {_human(result.peak_rss_bytes)}")
    runtime = art.manifest.get("runtime", {})
    console.print(f"cacher (applied at load): {json.dumps(runtime.get('cacher'))}")
    console.print(f"compiler (applied at load): {json.dumps(runtime.get('compiler'))}")
    console.print(f"[bold green]artifact[/] {art.path} ({_human(art.size)}, {len(art.manifest['files'])} files)")


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
def validate(manifest):
    """Check MANIFEST fully; print what it would build; write nothing."""
    spec = _load_manifest(manifest)
    click.echo(f"{manifest}: valid")
    click.echo(f"  source: {spec.model.source} ({spec.model.dtype})")
    q = spec.build.quantize
    click.echo(f"  bake: fuse_qkv={spec.build.fuse_qkv}, quantize={q.method if q else None}")
    click.echo(f"  runtime: cacher={json.dumps(spec.runtime.cacher)}, compiler={json.dumps(spec.runtime.compiler)}")
    click.echo(f"  output: {spec.output.dir}")


@main.command()
def schema():
    """Print the manifest's JSON Schema (for editor completion)."""
    from .manifest import manifest_json_schema

    click.echo(json.dumps(manifest_json_schema(), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
