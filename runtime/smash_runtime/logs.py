"""Logging set-up shared by the command-line tools."""

from __future__ import annotations

import logging
import warnings

# Import-time chatter of torch/torchao/transformers that says nothing to a user of an artifact:
# torchao's optional CUDA extensions missing on CPU, pytree enum notices, torchvision fallbacks.
_NOISY = ("torchao", "torch.utils._pytree", "transformers", "diffusers", "torch._dynamo", "torch._inductor")


def quiet_third_party_logs(level: int = logging.ERROR) -> None:
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
    except ImportError:  # the libraries are dependencies; this only guards odd installs
        pass
