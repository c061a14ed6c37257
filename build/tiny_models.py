"""Tiny random-weight pipelines built offline from configs.

They are the embedded default (``builtin:tiny-flux``) and the test fixtures: real
``FluxPipeline`` / ``StableDiffusionXLPipeline`` objects with every component
(denoiser, VAE, text encoders, tokenizers, scheduler), small enough to build in a
second and run on a CPU, and fully determined by ``seed``.

    >>> from smash_build.tiny_models import build_tiny
    >>> pipe = build_tiny("tiny-flux")
    >>> image = pipe("a cat", num_inference_steps=2, height=64, width=64).images[0]
"""

from __future__ import annotations

import string
from collections.abc import Callable

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

_VOCAB_WORDS = list(string.ascii_lowercase) + [str(d) for d in range(10)]


def _clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    # A character-level vocab with no merges: every word tokenises, nothing is downloaded.
    specials = ["<|startoftext|>", "<|endoftext|>"]
    tokens = specials + _VOCAB_WORDS + [c + "</w>" for c in _VOCAB_WORDS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _t5_tokenizer(max_length: int = 64) -> T5Tokenizer:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(w, 0.0) for w in _VOCAB_WORDS] + [
        ("\u2581" + w, 0.0) for w in _VOCAB_WORDS
    ]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _clip_config(hidden: int, projection: int, vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
    )


def _vae(latent_channels: int, **extra) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
        **extra,
    )


def tiny_flux_transformer_config(
    num_layers: int = 2, num_single_layers: int = 2, heads: int = 2, head_dim: int = 16
) -> dict:
    """Config of a small ``FluxTransformer2DModel``; scale it up for benchmarks."""
    return dict(
        patch_size=1,
        in_channels=16,
        out_channels=None,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8),
    )


def _tiny_flux(transformer_config: dict | None = None) -> FluxPipeline:
    clip_tok = _clip_tokenizer()
    t5_tok = _t5_tokenizer()
    transformer = FluxTransformer2DModel(**(transformer_config or tiny_flux_transformer_config()))
    text_encoder = CLIPTextModel(_clip_config(32, 32, len(clip_tok)))
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    vae = _vae(
        latent_channels=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def _tiny_sdxl() -> StableDiffusionXLPipeline:
    tok = _clip_tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 + 32
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(latent_channels=4),
        text_encoder=CLIPTextModel(_clip_config(32, 32, len(tok))),
        tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(32, 32, len(tok))),
        tokenizer_2=_clip_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            timestep_spacing="leading",
            steps_offset=1,
        ),
    )


TINY_MODELS: dict[str, Callable[[], object]] = {"tiny-flux": _tiny_flux, "tiny-sdxl": _tiny_sdxl}


def build_tiny(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs):
    """Build the tiny pipeline ``name`` with weights drawn from ``seed``, in eval mode."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {sorted(TINY_MODELS)}")
    # Fork the RNG so building a fixture never disturbs the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = TINY_MODELS[name](**kwargs)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval().requires_grad_(False)
            component.to(dtype)
    return pipe
