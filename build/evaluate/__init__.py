"""Evaluation: an artifact measured against its base model (speed, memory, size, fidelity).

    >>> from smash_build.evaluate.runner import evaluate
    >>> from smash_build.evaluate.settings import settings_from_dict
    >>> ev = evaluate("dist/tiny-flux", settings_from_dict({"num_prompts": 16, "steps": 4, "height": 64, "width": 64}))

Modules: ``prompts`` (prompt sets), ``metrics`` (PSNR/SSIM/MS-SSIM, learned metrics with an
offline preflight), ``settings`` (the ``[evaluate]`` table), ``phase`` (one side: load, time,
measure memory; runs in its own process), ``runner`` (base vs configurations), ``report``
(eval/results.json, samples, model card), ``plots``, ``sweep`` (several runtime settings of one
build) and ``cli`` (the click commands).
"""
