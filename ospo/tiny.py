"""Build a tiny, random Janus (and its tokenizer) on disk, offline.

No weights can be downloaded on CI or on a laptop without network, yet every stage must
run through the same ``from_pretrained(path)`` that loads DeepSeek's Janus-Pro. This
module writes a directory that looks exactly like a converted Janus-Pro checkpoint
(``config.json``, safetensors, tokenizer, processor with chat template, generation
config) but holds a model of well under a million parameters.

    python -m ospo.tiny OUT_DIR            # writes the directory, prints its path

``configs/tiny.yaml`` points ``model.path`` at ``tiny:`` which resolves to a cached
build of this (see :func:`resolve_model_path`).

The tokenizer is a byte-level BPE trained in-process with ``tokenizers`` (about 10 ms),
with the special tokens a Janus-Pro tokenizer has. Byte-level means every string is
encodable, so the model can be asked anything the templates ask a real Janus-Pro.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

# Janus-Pro's special tokens (the strings of DeepSeek's tokenizer; ids are ours).
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
IMAGE = "<image_placeholder>"
BOI = "<begin_of_image>"
EOI = "<end_of_image>"
USER = "<|User|>"
ASSISTANT = "<|Assistant|>"
SPECIALS = [BOS, EOS, PAD, IMAGE, BOI, EOI, USER, ASSISTANT]

# Same conversation format as the Janus-Pro processor that transformers' conversion
# script writes ("<|User|>: ...\n\n<|Assistant|>:"), written here from that format's
# description: user turns end with a blank line, assistant turns with EOS, images become
# <image_placeholder> (the processor expands it to BOI + placeholders + EOI).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] | lower == 'user' %}<|User|>: "
    "{% elif message['role'] | lower == 'assistant' %}<|Assistant|>: "
    "{% else %}{{ message['role'] | capitalize }}: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image_placeholder>{{ '\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] | lower == 'assistant' %}<｜end▁of▁sentence｜>{% else %}{{ '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>:{% endif %}"
)

_BASE_CORPUS = """
a an the and or of on in to with without is are there one two three four five six
red green blue yellow purple orange black white brown pink gray
circle circles square squares triangle triangles star stars ring rings cat dog dogs bench
left right above below behind front next near inside under over top bottom middle
small large big tiny striped dotted plain wooden metal glass furry shiny
yes no Yes No Question Answer Prompt Objects Prompts Perturbed Dense Replace Swap Drop
Write describe image picture scene photo of A An The This That
""".split()


def _corpus(extra: list[str] | None = None) -> list[str]:
    # Templates are imported lazily so this module stays importable on its own.
    from ospo import templates

    lines = list(_BASE_CORPUS)
    lines += templates.corpus_lines()
    lines += list(extra or [])
    return lines


def build_tokenizer(vocab_size: int = 1024, extra_corpus: list[str] | None = None):
    """Train a byte-level BPE tokenizer with Janus-Pro's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(extra_corpus), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        image_token=IMAGE,
        boi_token=BOI,
        eoi_token=EOI,
        add_bos_token=True,
        padding_side="left",
        model_max_length=4096,
    )


def tiny_config(
    tokenizer,
    *,
    hidden: int = 64,
    layers: int = 6,
    heads: int = 4,
    kv_heads: int = 2,
    grid: int = 8,
    codebook: int = 256,
    vq_channels: int = 32,
    vq_levels: int = 4,
    vision_layers: int = 2,
):
    """A JanusConfig that satisfies the constraints between its three sub-configs.

    Decoded image side = grid * 2**(vq_levels - 1); the vision encoder sees the same side
    with patch size side // grid, so understanding and generation both use grid**2 tokens
    (Janus-Pro: 384 px, 24 x 24 = 576).
    """
    from transformers import JanusConfig, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

    side = grid * 2 ** (vq_levels - 1)
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = JanusVisionConfig(
        hidden_size=hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=heads,
        image_size=side,
        patch_size=side // grid,
        projection_dim=hidden,
        num_image_tokens=grid * grid,
        mlp_ratio=2.0,
    )
    mults = [1, 1] + [2] * max(0, vq_levels - 2)
    vq = JanusVQVAEConfig(
        embed_dim=8,
        num_embeddings=codebook,
        latent_channels=vq_channels,
        base_channels=vq_channels,
        channel_multiplier=mults[:vq_levels],
        num_res_blocks=1,
        projection_dim=hidden,
        image_token_embed_dim=hidden,
    )
    return JanusConfig(
        text_config=text,
        vision_config=vision,
        vq_config=vq,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
    )


def make_processor(tokenizer, config):
    """The ``JanusProcessor`` of a checkpoint built here: image side from the vision config,
    mean/std 0.5 (pixels in [-1, 1], Janus' normalization), our chat template."""
    from transformers import JanusImageProcessor, JanusProcessor

    side = config.vision_config.image_size
    image_processor = JanusImageProcessor(
        size={"height": side, "width": side}, image_mean=[0.5] * 3, image_std=[0.5] * 3, min_size=4
    )
    return JanusProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        num_image_tokens=config.vision_config.num_image_tokens,
    )


def save_checkpoint(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write model + processor + generation config, as a converted Janus-Pro checkpoint has."""
    from transformers import GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        generation_kwargs={"boi_token_id": tokenizer.convert_tokens_to_ids(BOI)},
    )
    model.save_pretrained(out)
    make_processor(tokenizer, model.config).save_pretrained(out)
    return out


def build_tiny_janus(out_dir: str | os.PathLike, *, seed: int = 0, tokenizer=None, **config_kwargs) -> Path:
    """Write a random tiny Janus checkpoint (model, processor, generation config) to out_dir."""
    import torch
    from transformers import JanusForConditionalGeneration

    tokenizer = tokenizer or build_tokenizer()
    config = tiny_config(tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(config)
    return save_checkpoint(model, tokenizer, out_dir)


def _builder_fingerprint() -> str:
    """Hash of this file and the templates: a cached tiny model is rebuilt when they change."""
    from ospo import templates

    h = hashlib.sha256()
    for mod in (sys.modules[__name__], templates):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:12]


def cache_dir() -> Path:
    return Path(os.environ.get("OSPO_CACHE", Path.home() / ".cache" / "ospo"))


def resolve_model_path(path: str) -> str:
    """Map the special path ``tiny:`` to a cached tiny checkpoint, building it once, and
    ``shapes:`` to the shipped ShapesWorld checkpoint (:mod:`ospo.shapes.pretrain`).

    Any other value is returned unchanged for ``from_pretrained`` (a hub id or a local
    directory).
    """
    if path.startswith("shapes:"):
        from ospo.shapes.pretrain import packaged_checkpoint

        return str(packaged_checkpoint())
    if not path.startswith("tiny:"):
        return path
    target = cache_dir() / f"tiny-janus-{_builder_fingerprint()}"
    if not (target / "config.json").exists():
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        build_tiny_janus(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process built it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m ospo.tiny OUT_DIR", file=sys.stderr)
        return 2
    print(build_tiny_janus(argv[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

__all__ = ["build_tokenizer", "tiny_config", "build_tiny_janus", "resolve_model_path", "json"]
