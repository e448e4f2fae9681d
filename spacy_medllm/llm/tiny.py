"""The embedded tiny model: tokenizers and small Qwen2/Llama models built from a corpus.

The project's machines have no model hub, so the default model is built here and saved in
the Hugging Face format: the loader and the generator then treat it exactly like a local
7B checkpoint. Two tokenizers share one pipeline (Qwen2's: NFC, Qwen2's pre-tokenization
regex, byte-level BPE), one set of special tokens and one ChatML template:

- a *character-level* tokenizer, the default for the tiny model: its merges only rebuild
  the characters of the corpus from their UTF-8 bytes, so each known character is one
  token (offsets in generated text are character offsets) and any other character falls
  back to its bytes (no <unk>, exact round trip);
- a small *trained* BPE tokenizer, whose tokens span several characters and can glue
  ``[`` to the following text as real Qwen tokenizers do; tests of decoding, alignment and
  copy-constrained generation use it.

Both are byte-level BPE rather than a WordLevel model because transformers 5 loads every
``qwen2`` checkpoint's tokenizer as ``Qwen2Tokenizer``, which rebuilds this exact
pipeline from the saved vocabulary and merges: anything else would change on reload.
"""
import re
import string
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence, Tuple, Union

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Order fixes the ids 0..2 of both tokenizers.
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)

# Qwen2's ChatML template without the default system message (it would only cost the tiny
# model context).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Full-width punctuation common in Chinese clinical text, kept in every character vocab so a
# corpus that lacks one still gives user text one token per character.
FULLWIDTH_PUNCT = "，。、；：？！“”‘’（）【】《》〈〉「」『』〔〕…—～·％＋－／＝＜＞［］｛｝"
# Qwen2's pre-tokenization regex: one punctuation character may prefix a run of letters,
# so "[头痛" is one pre-token and BPE can learn tokens such as "[头".
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ARCHITECTURES = ("qwen2", "llama")
_JSON_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")


def read_corpus_text(paths: Iterable[Union[str, Path]]) -> str:
    """All characters of the corpus files, whatever their format (JSON, JSONL, text).

    The raw file text is enough for a character vocabulary; ``\\uXXXX`` escapes (JSON
    written with ``ensure_ascii``) are decoded as well so their characters are not missed.
    """
    parts: List[str] = []
    for path in paths:
        text = Path(path).read_bytes().decode("utf-8-sig", errors="replace")
        parts.append(text)
        escaped = [chr(int(code, 16)) for code in _JSON_ESCAPE.findall(text)]
        parts.append("".join(ch for ch in escaped if not 0xD800 <= ord(ch) <= 0xDFFF))
    return "".join(parts)


def char_vocabulary(text: str) -> List[str]:
    """The characters of ``text`` plus ASCII printable and full-width punctuation, sorted."""
    chars = set(text) | set(string.printable) | set(FULLWIDTH_PUNCT)
    chars.discard("\ufffd")
    return sorted(chars)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's table from bytes to the printable characters byte-level BPE vocabularies use."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def build_char_tokenizer(text: str):
    """A character-level tokenizer: one token per character of ``text`` (see module doc).

    The vocabulary is the special tokens, the 256 bytes, and for each character the chain
    of merges that joins its UTF-8 bytes. UTF-8 is prefix-free and a character's first
    byte is never a continuation byte, so no merge ever joins bytes of two characters.
    """
    table = bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for byte in range(256):
        vocab[table[byte]] = len(vocab)
    merges: List[Tuple[str, str]] = []
    for ch in char_vocabulary(text):
        pieces = [table[byte] for byte in ch.encode("utf-8")]
        merged = pieces[0]
        for piece in pieces[1:]:
            if merged + piece not in vocab:
                merges.append((merged, piece))
                vocab[merged + piece] = len(vocab)
            merged += piece
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    _qwen2_pipeline(backend)
    return wrap_tokenizer(backend)


def build_bpe_tokenizer(texts: Sequence[str], vocab_size: int = 2000):
    """A byte-level BPE tokenizer trained on ``texts`` with Qwen2's pre-tokenization."""
    backend = Tokenizer(models.BPE())
    _qwen2_pipeline(backend)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return wrap_tokenizer(backend)


def _qwen2_pipeline(backend: Tokenizer) -> None:
    """Qwen2Tokenizer's normalizer, pre-tokenizer and decoder."""
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()


def wrap_tokenizer(backend: Tokenizer):
    """Wrap a ``tokenizers`` backend with the shared special tokens and ChatML template.

    EOS is ``<|im_end|>`` (the end of an assistant turn) and pad and unk are
    ``<|endoftext|>``, as in Qwen2-Instruct; padding is on the left, for batched generation.
    """
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=PAD_TOKEN,
        extra_special_tokens=[IM_START],
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of a tiny causal LM; ``arch`` is ``"qwen2"`` or ``"llama"``.

    bitsandbytes 4-bit on a CPU packs weights in blocks of 64 input features, so a tiny
    model meant to be loaded in 4 bits needs ``hidden`` and ``intermediate`` divisible by 64.
    """

    arch: str = "qwen2"
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 512
    max_positions: int = 4096
    seed: int = 0
    # One matrix embeds and unembeds: a copied character's output logit is then its own
    # embedding's, so copying works for every character at once instead of being learned
    # per character (untied, a 2,000-character alphabet never learned to copy). init-tiny
    # ties by default; untied here keeps the layout of the test fixtures' random models.
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"Unknown tiny architecture {self.arch!r}: use one of {ARCHITECTURES}.")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(
                f"hidden ({self.hidden}) must be divisible by heads ({self.heads}) and heads by "
                f"kv_heads ({self.kv_heads})."
            )


def build_tiny_model(tokenizer, config: TinyModelConfig = TinyModelConfig()):
    """A randomly initialised ``Qwen2ForCausalLM`` / ``LlamaForCausalLM`` for ``tokenizer``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config
    from transformers import Qwen2ForCausalLM

    archs = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
    config_cls, model_cls = archs[config.arch]
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    hf_config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden,
        intermediate_size=config.intermediate,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads,
        max_position_embeddings=config.max_positions,
        tie_word_embeddings=config.tie_embeddings,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
    )
    torch.manual_seed(config.seed)
    model = model_cls(hf_config)
    model.generation_config = GenerationConfig(
        eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False
    )
    return model


def init_tiny(
    output_dir: Union[str, Path],
    corpus: Sequence[Union[str, Path]],
    config: TinyModelConfig = TinyModelConfig(),
) -> Any:
    """Build the character tokenizer and a tiny model from ``corpus``, save both to
    ``output_dir`` and return the model."""
    output_dir = Path(output_dir)
    tokenizer = build_char_tokenizer(read_corpus_text(corpus))
    model = build_tiny_model(tokenizer, config)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return model
