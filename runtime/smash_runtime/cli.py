"""``smash-run``: load an artifact and write one image, or fill the compile cache.

Exit codes: 0 done; 1 any other project error (Hub unreachable, device lacks a kernel, ...);
2 a bad option or setting; 3 the artifact is malformed, tampered with or reaches outside
itself (:class:`~smash_runtime.errors.ArtifactError`); 4 an unexpected internal error (a bug:
please report it with the ``--debug`` traceback). Errors are one line on stderr; ``--debug``
or ``SMASH_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path

import click

from .errors import ArtifactError, SettingsError, SmashError
from .logs import NORMAL, QUIET, VERBOSE, configure_cli_logging, package_versions, quiet_third_party_logs

EXIT_ERROR, EXIT_BAD_INPUT, EXIT_BAD_ARTIFACT, EXIT_INTERNAL = 1, 2, ArtifactError.exit_code, 4


def exit_code_of(exc: BaseException) -> int:
    """The documented exit code for ``exc`` (see the module docstring)."""
    if isinstance(exc, ArtifactError):
        return EXIT_BAD_ARTIFACT
    if isinstance(exc, SettingsError):
        return EXIT_BAD_INPUT
    if isinstance(exc, SmashError):
        return EXIT_ERROR
    return EXIT_INTERNAL


def fail(exc: BaseException, debug: bool) -> None:
    """Print ``exc`` as one line (plus the traceback when debugging) and exit with its code."""
    if debug or os.environ.get("SMASH_DEBUG", "") not in ("", "0"):
        traceback.print_exception(exc)
    first = " ".join(str(exc).split())[:2000]
    label = "error" if isinstance(exc, SmashError) else f"internal error ({type(exc).__name__}; rerun with --debug)"
    click.echo(f"{label}: {first}", err=True)
    sys.exit(exit_code_of(exc))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("artifact")
@click.option("--prompt", default="a photo of a red cube on a wooden table", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--steps", type=click.IntRange(1, 1000), default=None, help="Denoising steps (default: the pipeline's).")
@click.option("--height", type=click.IntRange(16, 4096), default=None)
@click.option("--width", type=click.IntRange(16, 4096), default=None)
@click.option("--guidance-scale", type=float, default=None)
@click.option("--negative-prompt", default=None)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("out.png"), show_default=True)
@click.option("--device", default=None, help="cuda, cpu, cuda:1 ... (default: CUDA when available).")
@click.option("--no-cacher", is_flag=True, help="Do not apply the recorded cacher.")
@click.option("--no-compile", is_flag=True, help="Do not apply the recorded compiler.")
@click.option("--verify", type=click.Choice(["fast", "full"]), default="fast", show_default=True,
              help="fast: hash each file unless this machine already hashed that very, unchanged file; full: hash every file")
@click.option("--compile-cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Compile cache folder (default: $SMASH_COMPILE_CACHE, else $XDG_CACHE_HOME/smash/compile, "
                   "i.e. ~/.cache/smash/compile).")
@click.option("--no-compile-cache", is_flag=True, help="Compile without the on-disk cache (every process recompiles).")
@click.option("--precompile", is_flag=True, help="Compile and run the recorded warm-up shapes to fill the compile cache, then exit.")
@click.option("--timings", is_flag=True, help="Print the load phase timings as JSON on stderr.")
@click.option("-q", "--quiet", is_flag=True, help="Print errors only (no progress bars, no \"wrote ...\" line).")
@click.option("-v", "--verbose", is_flag=True, help="Also log the load phases, each line with its source location.")
@click.option("--debug", is_flag=True, help="Print the traceback of an error (also: SMASH_DEBUG=1).")
@click.version_option(message=package_versions("smash-run", "smash-runtime"))
def main(artifact, prompt, seed, steps, height, width, guidance_scale, negative_prompt, output, device,
         no_cacher, no_compile, verify, compile_cache, no_compile_cache, precompile, timings, quiet, verbose, debug):
    """Generate an image with the smash-build ARTIFACT (a folder or ORG/NAME[@REVISION] on the Hub).

    \b
    Examples:
      smash-run dist/tiny-flux --prompt "a red cube" --seed 0 --steps 4 --output cube.png
      smash-run dist/flux-dev-fast --precompile --compile-cache /cache

    Exit codes: 0 done, 1 error, 2 bad option or setting, 3 malformed or tampered artifact, 4 internal error.
    """
    if quiet and verbose:
        raise click.UsageError("-q and -v exclude each other")
    verbosity = QUIET if quiet else VERBOSE if verbose else NORMAL
    configure_cli_logging(verbosity, normal=logging.WARNING)  # the load phases are -v's detail
    if not verbose:
        quiet_third_party_logs(progress_bars=not quiet)

    def say(text: str) -> None:
        if not quiet:
            click.echo(text, err=True)

    from .images import encode_png, generate
    from .loader import load

    if no_compile_cache and (compile_cache is not None or precompile):
        click.echo("error: --no-compile-cache cannot be combined with --compile-cache or --precompile", err=True)
        sys.exit(2)
    try:
        pipe = load(artifact, device=device, verify=verify, cacher=not no_cacher, compiler=not no_compile,
                    warmup=precompile, compile_cache=False if no_compile_cache else (compile_cache or True),
                    progress=not quiet)
        if precompile:
            cache = pipe.smash.compile_cache
            if cache is None:
                say(f"no compiler applied to {artifact} (none recorded, or --no-compile): nothing to precompile")
            else:
                report = cache.report()
                how = "loaded from the cache" if report["hit"] else "compiled and stored"
                say(f"compile cache {report['folder']}: {how} (warm-up {pipe.smash.timings.get('warmup', 0.0):.1f}s)")
        else:
            image = generate(pipe, prompt, seed=seed, steps=steps, height=height, width=width,
                             guidance_scale=guidance_scale, negative_prompt=negative_prompt)[0]
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_bytes(encode_png(image))
            say(f"wrote {output} ({image.width}x{image.height})")
    except Exception as exc:  # noqa: BLE001 - every failure is one line and a documented exit code
        fail(exc, debug)
    if timings:
        click.echo(json.dumps(pipe.smash.timings, sort_keys=True), err=True)


if __name__ == "__main__":
    main()
