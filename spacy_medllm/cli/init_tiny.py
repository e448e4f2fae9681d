"""``python -m spacy medllm init-tiny``: build the embedded tiny model from a corpus."""
from pathlib import Path
from typing import List

from spacy.cli._util import Arg, Opt
from wasabi import msg

from .app import medllm_cli


@medllm_cli.command("init-tiny", short_help="Build a tiny character-level Qwen2/Llama and its tokenizer")
def init_tiny_cli(
    # fmt: off
    output_dir: Path = Arg(..., help="Directory to save the model and tokenizer to (Hugging Face format)", file_okay=False),
    corpus: List[Path] = Opt(..., "--corpus", "-c", help="Text, JSON or JSONL file whose characters form the vocabulary (repeatable)", exists=True, dir_okay=False),
    arch: str = Opt("qwen2", "--arch", "-a", help="Architecture: qwen2 or llama"),
    hidden: int = Opt(256, "--hidden", help="Hidden size"),
    layers: int = Opt(4, "--layers", help="Number of decoder layers"),
    heads: int = Opt(4, "--heads", help="Attention heads"),
    kv_heads: int = Opt(2, "--kv-heads", help="Key/value heads (grouped-query attention)"),
    intermediate: int = Opt(512, "--intermediate", help="MLP intermediate size"),
    max_positions: int = Opt(4096, "--max-positions", help="Maximum sequence length"),
    seed: int = Opt(0, "--seed", help="Seed of the random initialisation"),
    tie_embeddings: bool = Opt(True, "--tie-embeddings/--untie-embeddings", help="Share the input embedding and the output layer (what lets a small model learn to copy)"),
    # fmt: on
):
    """Build a character-level tokenizer (ChatML special tokens and chat template) from the
    characters of the corpus files and a randomly initialised tiny Qwen2 or Llama model
    with that vocabulary, and save both to OUTPUT_DIR. Load it like any local checkpoint
    (``spacy_medllm.ModelSpec.v1``, path = OUTPUT_DIR); fine-tune it before use.
    """
    from ..llm.tiny import TinyModelConfig, init_tiny

    try:
        config = TinyModelConfig(
            arch=arch, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
            intermediate=intermediate, max_positions=max_positions, seed=seed,
            tie_embeddings=tie_embeddings,
        )
        model = init_tiny(output_dir, corpus, config)
    except ValueError as err:
        msg.fail("Cannot build the tiny model", str(err), exits=1)
    n_params = sum(p.numel() for p in model.parameters())
    msg.good(
        f"Saved a tiny {arch} model ({n_params / 1e6:.2f}M parameters, vocabulary "
        f"{model.config.vocab_size}) to", str(output_dir)
    )
