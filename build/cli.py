"""``smash-build``: the command line. A manifest is the whole interface.

    smash-build manifests/tiny-flux.toml            # build the artifact the manifest describes
    smash-build manifests/tiny-flux.toml -o out/    # ... somewhere else
    smash-build validate manifests/tiny-flux.toml   # check it, write nothing
    smash-build schema > smash-manifest.schema.json # JSON Schema for editors
    smash-build M.toml --evaluate --push --image T  # build, then evaluate, publish, containerize
    smash-build publish dist/tiny-flux --repo ORG/NAME
    smash-build image dist/tiny-flux --tag smash/tiny-flux:1
    smash-build evaluate dist/tiny-flux             # latency, memory, fidelity vs the base
    smash-build sweep M.toml --vary runtime.cacher.interval=2,3,4
    smash-build validate M.toml --json              # one JSON object on stdout (also build, publish, image)
    smash-build -q M.toml                           # errors only; -v: debug lines with source locations
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path

import click
from rich import box
from rich.console import Console
from rich.table import Table

from smash_runtime.errors import SettingsError, SmashError
from smash_runtime.logs import NORMAL, QUIET, VERBOSE, configure_cli_logging, package_versions, quiet_third_party_logs

console = Console(stderr=True)
logger = logging.getLogger("smash_build")
EXIT_BAD_INPUT = 2
EXIT_CODES = {
    0: "done",
    1: "a step failed (build, evaluate, upload, docker); the message says which",
    2: "a bad manifest, option or argument; nothing was written",
}


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


def _set_output(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """Record -q, -v or --json (given on the group or on the command) for :func:`_say` and friends."""
    if value:
        ctx.meta[f"smash_build.{param.name}"] = True
        if ctx.meta.get("smash_build.quiet") and ctx.meta.get("smash_build.verbose"):
            raise click.UsageError("-q and -v exclude each other", ctx=ctx)


def _loudness_options(command):
    """``-q``/``-v`` on a command (and the group): errors only, or debug lines with source locations."""
    command = click.option("-v", "--verbose", is_flag=True, expose_value=False, callback=_set_output,
                           help="Debug log lines, each with its source location (cli.py:123).")(command)
    return click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_set_output,
                        help="Print errors only (no log lines, bars or tables).")(command)


def _json_option(command):
    """``--json``: one JSON object on stdout; human lines go to stderr."""
    return click.option("--json", "as_json", is_flag=True, expose_value=False, callback=_set_output,
                        help="Print one JSON object on stdout (human lines go to stderr).")(command)


def _output(key: str) -> bool:
    return bool(click.get_current_context().meta.get(f"smash_build.{key}"))


def _verbosity() -> int:
    return QUIET if _output("quiet") else VERBOSE if _output("verbose") else NORMAL


def _say(text: str) -> None:
    """A human line: stdout, or stderr under --json, or nothing under -q."""
    if not _output("quiet"):
        click.echo(text, err=_output("as_json"))


def _emit(result: dict) -> None:
    """The command's one JSON object on stdout, under --json."""
    if _output("as_json"):
        click.echo(json.dumps(result, sort_keys=True))


def _configure_logging() -> None:
    from rich.logging import RichHandler

    verbosity = _verbosity()
    if verbosity == QUIET:
        quiet_third_party_logs(progress_bars=False)
    configure_cli_logging(verbosity, RichHandler(console=console, show_level=verbosity > NORMAL,
                                                 show_path=verbosity > NORMAL, markup=False))


def _artifact_json(art) -> dict:
    """What a script needs about a written artifact: where, which (sha256 of smash.json), how big."""
    record = (Path(art.path) / "smash.json").read_bytes()
    return {"path": str(Path(art.path).resolve()), "smash_json_sha256": hashlib.sha256(record).hexdigest(),
            "size_bytes": art.size + len(record), "files": len(art.record.files) + 1}  # smash.json counted


def _publish_json(result) -> dict:
    return {"repo": result.repo_id, "revision": result.revision, "dry_run": result.dry_run,
            "commit_sha": result.commit_sha, "commit_url": result.commit_url,
            "files": len(result.files), "size_bytes": result.total_bytes}


def _image_json(info) -> dict:
    return {"tag": info.tag, "id": info.id, "size_bytes": info.size, "build_seconds": round(info.build_seconds, 3),
            "pushed_digest": info.pushed_digest}


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


@click.group(cls=_ManifestGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog="\b\nExit codes:\n" + "\n".join(f"  {code}  {meaning}" for code, meaning in EXIT_CODES.items()))
@click.version_option(message=package_versions("smash-build", "smash-build", "smash-runtime"))
@_loudness_options
@click.pass_context
def main(ctx: click.Context):
    """Bake QKV fusion and quantization into a diffusion model and write a deployable artifact.

    Run `smash-build MANIFEST.toml` to build; see `smash-build COMMAND --help` for the rest.
    """
    if ctx.invoked_subcommand not in _TORCH_FREE_COMMANDS:
        quiet_third_party_logs()  # configures diffusers' and transformers' loggers, importing them


# Commands that never import torch or diffusers (they start in a fraction of a second).
_TORCH_FREE_COMMANDS = ("validate", "schema")


@main.command("build")
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Artifact folder (overrides [output] dir).")
@click.option("--evaluate", "run_evaluate", is_flag=True,
              help="Then measure the artifact against its base ([evaluate] settings) and write the model card.")
@click.option("--push", is_flag=True, help="Then publish the artifact as [publish.hub] says.")
@click.option("--image", "image_tag", default=None, metavar="TAG",
              help="Then build a container image TAG serving the artifact ([publish.image] gives the defaults).")
@_json_option
@_loudness_options
def build_cmd(manifest, out_dir, run_evaluate, push, image_tag):
    """Build the artifact MANIFEST describes (then optionally evaluate, publish, containerize)."""
    spec = _load_manifest(manifest)
    if push and not spec.publish_hub:
        raise click.UsageError(f"--push needs a [publish.hub] table with repo = \"ORG/NAME\" in {manifest}")
    # [publish.image] include_compile_cache = true means "precompile inside the image build".
    recorded = spec.publish_image or {}
    image_spec = {"tag": image_tag or recorded.get("tag"), "base": recorded.get("base"),
                  "push": bool(recorded.get("push")), "precompile": True}
    if recorded.get("push") and not image_spec["tag"]:
        raise click.UsageError(f"[publish.image] push = true needs a tag in {manifest}")
    try:
        result = _run_build(spec, out_dir)
        if not _output("quiet"):
            _print_summary(result)
        summary = {"artifact": _artifact_json(result.artifact),
                   "components": [{"name": c.name, "bytes_before": c.bytes_before, "bytes_after": c.bytes_after}
                                  for c in result.changes]}
        if run_evaluate:
            from .evaluate.cli import evaluate_after_build

            evaluate_after_build(result, spec)
        if push:
            from .exporters.hub import format_publish_result, publish_from_manifest
            from .model_card import card_for_repo

            published = publish_from_manifest(result.artifact.path, spec.publish_hub, card=card_for_repo)
            _say(format_publish_result(published))
            summary["publish"] = _publish_json(published)
        if image_tag or recorded.get("push"):
            summary["image"] = _image_json(_build_image(result.artifact.path, image_spec))
    except SmashError as exc:
        _fail(exc)
    _emit(summary)


def _run_build(spec, out_dir):
    """Build with a log line per phase and a bar (with ETA) over the blocks of streamed components."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .builder import build

    _configure_logging()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=_output("quiet")) as bars:
        tasks: dict[str, int] = {}
        current = {"name": "build"}

        def step(message: str) -> None:
            logger.info(message, stacklevel=2)  # -v shows the builder's line, not this one
            current["name"] = message

        def progress(done: int, total: int, unit: str) -> None:
            name = current["name"]
            if name not in tasks:
                tasks[name] = bars.add_task(name, total=total)
            bars.update(tasks[name], completed=done, description=f"{name}: {unit}")

        return build(spec, out_dir=out_dir, step=step, progress=progress)


def _print_summary(result) -> None:
    # Fits 80 columns with the longest component name whole (text_encoder_2): simple box, short headers.
    table = Table(title="baked", box=box.SIMPLE_HEAD, show_lines=False)
    table.add_column("component", no_wrap=True, min_width=max((len(c.name) for c in result.changes), default=9))
    for col in ("before", "after", "ratio", "fused", "quantized", "excluded"):
        table.add_column(col, justify="right", no_wrap=True)
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
    runtime = art.record.runtime_settings
    console.print(f"cacher (applied at load): {json.dumps(runtime.cacher)}")
    console.print(f"compiler (applied at load): {json.dumps(runtime.compiler)}")
    console.print(f"[bold green]artifact[/] {art.path} ({_human(art.size)}, {len(art.record.files)} files)")


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@_json_option
@_loudness_options
def validate(manifest):
    """Check MANIFEST fully; print what it would build; write nothing."""
    spec = _load_manifest(manifest)
    q = spec.build.quantize
    loras = [{"source": lora.source, "scale": lora.scale} for lora in spec.build.lora]
    if _output("as_json"):
        _emit({"manifest": manifest, "valid": True, "source": spec.model.source, "dtype": spec.model.dtype,
               "lora": loras, "fuse_qkv": spec.build.fuse_qkv, "quantize": q.method if q else None,
               "cacher": spec.runtime.cacher, "compiler": spec.runtime.compiler, "serve": spec.serve or None,
               "output": str(spec.output.dir)})
        return
    _say(f"{manifest}: valid")
    _say(f"  source: {spec.model.source} ({spec.model.dtype})")
    lora_text = ", ".join(f"{lora['source']} x{lora['scale']:g}" for lora in loras) or None
    _say(f"  bake: lora={lora_text}, fuse_qkv={spec.build.fuse_qkv}, quantize={q.method if q else None}")
    _say(f"  runtime: cacher={json.dumps(spec.runtime.cacher)}, compiler={json.dumps(spec.runtime.compiler)}")
    if spec.serve:
        _say(f"  serve: {json.dumps(spec.serve)}")
    _say(f"  output: {spec.output.dir}")


@main.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--repo", required=True, metavar="ORG/NAME", help="Hub model repo (created if missing).")
@click.option("--revision", default=None, help="Branch to commit to (default main; created if missing).")
@click.option("--private", is_flag=True, help="Create the repo private (an existing public repo is refused).")
@click.option("-m", "--message", default=None, help="Commit message.")
@click.option("--dry-run", is_flag=True, help="Verify and list what would be uploaded; no token, no network.")
@_json_option
@_loudness_options
def publish(artifact, repo, revision, private, message, dry_run):
    """Verify ARTIFACT and upload it to the Hugging Face Hub in one commit (token: HF_TOKEN or `hf auth login`).

    The model card is rewritten for the repo (its snippet loads ORG/NAME@REVISION) unless it was edited by hand.
    """
    from .exporters.hub import format_publish_result, publish_artifact
    from .model_card import card_for_repo

    try:
        result = publish_artifact(artifact, repo, private=private, revision=revision, commit_message=message,
                                  dry_run=dry_run, card=card_for_repo)
    except SmashError as exc:
        _fail(exc)
    _say(format_publish_result(result))
    _emit(_publish_json(result))


@main.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("-t", "--tag", default=None, help="Image tag (default: smash/<artifact folder name>:latest).")
@click.option("--base", default=None,
              help="Base image (default: python:X.Y-slim-bookworm for cpu, pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime "
                   "for cuda).")
@click.option("--variant", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cpu: the image installs the host's torch build; cuda: torch comes from the base, which must "
                   "have a CUDA build (checked before building).")
@click.option("--compile-cache", type=click.Path(exists=True, file_okay=False), default=None,
              help="Bake this compile-cache folder (from `smash-run --precompile`) into the image.")
@click.option("--no-precompile", is_flag=True, help="Do not precompile inside the image build.")
@click.option("--context-only", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the docker build context to this folder instead of building.")
@click.option("--push", is_flag=True, help="Push the image after building it.")
@click.option("--with-ray", is_flag=True,
              help="Also install Ray Serve, so the image can join a Ray cluster (smash-build deploy --kuberay).")
@_json_option
@_loudness_options
def image(artifact, tag, base, variant, compile_cache, no_precompile, context_only, push, with_ray):
    """Bake ARTIFACT and smash-runtime into a reproducible container image that serves it over HTTP."""
    spec = {"tag": tag or f"smash/{Path(artifact).resolve().name}:latest", "push": push, "variant": variant,
            "include_compile_cache": compile_cache, "precompile": not no_precompile, "with_ray": with_ray}
    if base:
        spec["base"] = base
    try:
        if context_only:
            from .exporters.image import write_build_context

            info = write_build_context(artifact, context_only, **_image_options(spec), log=_say)
            _say(f"build context written to {info.path} ({info.files} files, {_human(info.size)}); "
                 f"build it with: docker build {info.path}")
            _emit({"context": str(Path(info.path).resolve()), "tag": spec["tag"], "files": info.files,
                   "size_bytes": info.size, "smash_json_sha256": info.artifact_sha256})
            return
        _emit(_image_json(_build_image(artifact, spec)))
    except SmashError as exc:
        _fail(exc)


def _image_options(spec: dict) -> dict:
    options = {"variant": spec.get("variant", "cpu"), "include_compile_cache": spec.get("include_compile_cache"),
               "precompile": spec.get("precompile", True), "with_ray": bool(spec.get("with_ray"))}
    if spec.get("base"):
        options["base_image"] = spec["base"]
    return options


def _build_image(artifact, spec: dict):
    from .exporters.image import build_image

    info = build_image(artifact, spec["tag"], push=bool(spec.get("push")), log=_say, **_image_options(spec))
    _say(f"image {info.tag} ({info.id[:19]}, {_human(info.size)}, built in {info.build_seconds:.0f}s)")
    if info.pushed_digest:
        _say(f"pushed {info.pushed_digest}")
    _say(f"run it with: docker run --rm -p 8000:8000 {info.tag}")
    return info


@main.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--image", "image_ref", required=True, metavar="TAG",
              help="Image serving the artifact, built with `smash-build image ART --with-ray`.")
@click.option("--kuberay", is_flag=True, required=True, help="Write a KubeRay RayService (the only target so far).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File to write (default: stdout).")
@click.option("--name", default=None, help="RayService name (default: the artifact's name).")
@click.option("--compile-cache-claim", default=None, metavar="PVC",
              help="PersistentVolumeClaim for the compile cache (default: an emptyDir per pod).")
@click.option("--memory", default="8Gi", show_default=True, help="Memory request and limit of each pod.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Scaling setting over the artifact's [serve] (e.g. --set max_replicas=8); repeatable.")
def deploy(artifact, image_ref, kuberay, output, name, compile_cache_claim, memory, overrides):
    """Write a Kubernetes manifest that serves ARTIFACT's image on a Ray cluster (docs/ray.md)."""
    from .exporters.kuberay import dump_rayservice, rayservice_manifest
    from .manifest import parse_override

    try:
        scaling = dict(parse_override(text) for text in overrides)
        text = dump_rayservice(rayservice_manifest(artifact, image=image_ref, name=name, scaling=scaling,
                                                   compile_cache_claim=compile_cache_claim, memory=memory))
    except SmashError as exc:
        _fail(exc)
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
        click.echo(f"wrote {output}; apply it with: kubectl apply -f {output}", err=True)


@main.command()
def schema():
    """Print the manifest's JSON Schema (for editor completion)."""
    from .manifest import manifest_json_schema

    click.echo(json.dumps(manifest_json_schema(), indent=2, sort_keys=True))


from .evaluate.cli import evaluate_cmd, sweep_cmd  # noqa: E402  (click commands; heavy imports stay lazy)

main.add_command(evaluate_cmd)
main.add_command(sweep_cmd)

if __name__ == "__main__":
    main()
