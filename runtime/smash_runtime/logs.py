"""Logging set-up shared by the command-line tools."""

from __future__ import annotations

import logging
import warnings

# Import-time chatter of torch/torchao/transformers that says nothing to a user of an artifact:
# torchao's optional CUDA extensions missing on CPU, pytree enum notices, torchvision fallbacks.
_NOISY = ("torchao", "torch.utils._pytree", "transformers", "diffusers", "torch._dynamo", "torch._inductor")


def quiet_third_party_logs(level: int = logging.ERROR, progress_bars: bool = True) -> None:
    """Cut torch/diffusers/transformers log lines below ``level``; ``progress_bars=False`` (for ``-q``)
    also hides diffusers' own bars ("Loading pipeline components")."""
    for name in _NOISY:
        logging.getLogger(name).setLevel(level)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torchao")
    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()  # per-file "Writing model shards" bars; we show our own
        if not progress_bars:
            diffusers_logging.disable_progress_bar()
    except ImportError:  # the libraries are dependencies; this only guards odd installs
        pass


# Loudness of a command-line tool, from -q / (nothing) / -v.
QUIET, NORMAL, VERBOSE = -1, 0, 1


def cli_log_level(verbosity: int, normal: int = logging.INFO) -> int:
    """The root log level for ``verbosity``: warnings with ``-q``, ``normal`` by default, debug with ``-v``.

        >>> cli_log_level(QUIET), cli_log_level(VERBOSE)
        (30, 10)
    """
    return logging.WARNING if verbosity < NORMAL else logging.DEBUG if verbosity > NORMAL else normal


def configure_cli_logging(verbosity: int, handler: logging.Handler | None = None,
                          normal: int = logging.INFO) -> None:
    """Send every logger's records to ``handler`` (default: plain lines on stderr) at :func:`cli_log_level`.

    Only ``-v`` (``verbosity > 0``) adds where each line was logged (``loader.py:205``). This
    imports nothing: callers that load torch also call :func:`quiet_third_party_logs` unless ``-v``.

        configure_cli_logging(VERBOSE)   # smash-run -v
    """
    if handler is None:
        handler = logging.StreamHandler()  # stderr
        where = " (%(filename)s:%(lineno)d)" if verbosity > NORMAL else ""
        handler.setFormatter(logging.Formatter(f"%(levelname)s %(name)s: %(message)s{where}"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(cli_log_level(verbosity, normal))


def package_versions(tool: str, *packages: str,
                     libraries: tuple[str, ...] = ("torch", "diffusers", "torchao")) -> str:
    """``--version`` text: the tool's own packages, then the libraries it runs on (read from the
    installed metadata, so nothing, torch included, is imported).

        >>> print(package_versions("smash-run", "smash-runtime"))  # doctest: +SKIP
        smash-run (smash-runtime) 0.1.0
        python 3.11.2, torch 2.13.0, diffusers 0.42.1, torchao 0.18.0
    """
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:  # running from a source tree that was never installed
            return "not installed"

    first, *rest = packages
    label = tool if tool == first else f"{tool} ({first})"  # "smash-run (smash-runtime) 0.1.0"
    own = ", ".join([f"{label} {installed(first)}", *(f"{name} {installed(name)}" for name in rest)])
    return own + "\n" + ", ".join([f"python {platform.python_version()}",
                                   *(f"{name} {installed(name)}" for name in libraries)])
