"""Instruction-tuning data: chat records, their tokenisation with a response-only label
mask, the length cutoff, length-bucketed batches and per-token loss weights."""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from spacy.util import registry
from wasabi import msg

from .. import DEFAULT_SPANS_KEY
from ..errors import SFTError
from ..types import Mention

IGNORE_INDEX = -100



@dataclass(frozen=True)
class ChatRecord:
    """One training conversation; the last message is the assistant's answer to learn.

    ``n_entities`` (from the record, when it states it) lets the trainer subsample
    records without entities; ``source`` is ``file:line`` for messages."""

    messages: Tuple[Tuple[str, str], ...]
    source: str
    n_entities: Optional[int] = None

    def as_messages(self) -> List[Dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


def read_chat_records(path: Union[str, Path], limit: int = 0) -> List[ChatRecord]:
    """Read messages-form JSONL (``{"messages": [{"role", "content"}, …]}`` per line).

    A record's entity count is read from ``n_entities`` or ``meta.n_entities`` when
    present. Broken lines are skipped and reported with their line numbers; a file with no
    usable record is an error.
    """
    path = Path(path)
    if not path.exists():
        raise SFTError(
            f"Training data {path} does not exist. Write it with `python -m spacy medllm "
            "build-instructions INPUT.spacy OUT_DIR --strategy NAME` and point the config at the "
            "*.messages.jsonl file."
        )
    if path.is_dir():
        raise SFTError(f"Training data {path} is a directory; point it at a *.messages.jsonl file.")
    records: List[ChatRecord] = []
    problems: List[str] = []
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                data = json.loads(line)
            except ValueError as err:
                problems.append(f"{where}: bad JSON ({err})")
                continue
            record, problem = _chat_record(data, where)
            if problem:
                problems.append(f"{where}: {problem}")
                continue
            records.append(record)
            if limit and len(records) >= limit:
                break
    if problems:
        shown = "\n".join(problems[:10]) + (f"\n… and {len(problems) - 10} more" if len(problems) > 10 else "")
        msg.warn(f"Skipped {len(problems)} malformed record(s) in {path}", shown)
    if not records:
        raise SFTError(
            f"{path} holds no usable record: each line must be a JSON object with \"messages\", a "
            "list of {\"role\", \"content\"} that ends with the assistant's answer."
        )
    return records


def _chat_record(data: Any, where: str) -> Tuple[Optional[ChatRecord], str]:
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list) or not data["messages"]:
        return None, "no \"messages\" list"
    messages = []
    for m in data["messages"]:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return None, "a message is not {\"role\": str, \"content\": str}"
        messages.append((m["role"], m["content"]))
    if messages[-1][0] != "assistant" or len(messages) < 2:
        return None, "the last message must be the assistant's answer, after at least one prompt message"
    n = data.get("n_entities", (data.get("meta") or {}).get("n_entities"))
    n_entities = n if isinstance(n, int) and not isinstance(n, bool) else None
    return ChatRecord(tuple(messages), where, n_entities), ""


@registry.readers("spacy_medllm.ChatRecords.v1")
def make_chat_records(path: str, limit: int = 0) -> List[ChatRecord]:
    """The records of a messages-form JSONL file (see :func:`read_chat_records`)."""
    return read_chat_records(path, limit)


@dataclass(frozen=True)
class GoldText:
    """A text and its gold mentions (character offsets), with where it came from."""

    text: str
    mentions: Tuple[Mention, ...]
    source: str


def read_gold_texts(path: Union[str, Path], spans_key: str = DEFAULT_SPANS_KEY, limit: int = 0) -> List[GoldText]:
    """Gold texts from a ``.spacy`` file (``doc.spans[spans_key]``, else ``doc.ents``) or
    from any corpus format the readers know (CMeEE JSON, BIO, …; guessed from content)."""
    from spacy.tokens import DocBin
    from spacy.vocab import Vocab

    from ..readers import CONVERTERS, guess_converter, read_docs
    from ..strategies.base import mentions_from_doc

    path = Path(path)
    if not path.exists():
        raise SFTError(f"Corpus {path} does not exist; point the config at a .spacy file or a corpus file (e.g. assets/cmeee_dev.json).")
    if path.suffix == ".spacy":
        docs = DocBin().from_disk(path).get_docs(Vocab())
    else:
        docs = read_docs(path, CONVERTERS[guess_converter(path)], Vocab(), spans_key=spans_key)
    texts = []
    for i, doc in enumerate(docs):
        source = str(doc.user_data.get("source", f"{path.name}#{i}"))
        texts.append(GoldText(doc.text, tuple(mentions_from_doc(doc, spans_key)), source))
        if limit and len(texts) >= limit:
            break
    return texts


def strategy_records(texts: Sequence[GoldText], strategy: Any, scheme: Any) -> List[ChatRecord]:
    """One chat record per prompt of ``strategy`` for each gold text, with its entity
    count (what ``negative_ratio`` needs); the same records ``build-instructions`` writes.
    Gold mentions of a type the scheme lacks are left out and counted."""
    records: List[ChatRecord] = []
    skipped = 0
    for gold in texts:
        mentions = [m for m in gold.mentions if m.label in scheme]
        skipped += len(gold.mentions) - len(mentions)
        for prompt in strategy.prompts(gold.text, scheme):
            response = strategy.render_target(gold.text, mentions, prompt)
            n = len(strategy.target_mentions(gold.text, mentions, prompt))
            messages = tuple((m["role"], m["content"]) for m in prompt.messages(response))
            records.append(ChatRecord(messages, gold.source, n))
    if skipped:
        msg.warn(f"{skipped} gold mention(s) of types outside the scheme {scheme.name!r} left out")
    return records


CLAUSE_ENDS = "，。；！？,;!?"


def clauses(gold: GoldText) -> List[GoldText]:
    """``gold`` cut after clause punctuation wherever no mention spans the cut; each piece
    keeps its mentions (offsets shifted)."""
    cuts = [0]
    for i, ch in enumerate(gold.text[:-1], 1):
        if ch in CLAUSE_ENDS and not any(m.start < i < m.end for m in gold.mentions):
            cuts.append(i)
    cuts.append(len(gold.text))
    pieces = []
    for a, b in zip(cuts, cuts[1:]):
        mentions = tuple(
            Mention(m.label, m.text, m.start - a, m.end - a) for m in gold.mentions if a <= m.start and m.end <= b
        )
        pieces.append(GoldText(gold.text[a:b], mentions, f"{gold.source}[{a}:{b}]"))
    return pieces


def mix_clauses(
    texts: Sequence[GoldText], n: int, seed: int = 0, max_clauses: int = 3, noise: float = 0.0
) -> List[GoldText]:
    """``n`` synthetic gold texts, each 1 to ``max_clauses`` clauses of random training
    texts joined, with their mentions; with ``noise`` > 0 that share of the characters
    outside every mention is replaced by characters drawn from the corpus.

    Why: a small model trained on a few thousand sentences learns to *recall* each training
    sentence from its prompt instead of learning to copy the prompt (README, "Where the
    code departs"), and then rewrites every unseen
    sentence into a remembered one. Texts it has never seen, made of real clauses with
    real annotation (the noise keeps it from recalling clauses), make copying the only
    way to fit the data.
    """
    import random

    rng = random.Random(seed)
    noise_rng = random.Random(seed + 7919)  # its own stream: the clauses chosen do not depend on noise
    pool = [c for g in texts for c in clauses(g) if c.text.strip()]
    if not pool:
        return []
    chars = "".join(g.text for g in texts)
    out = []
    for k in range(n):
        parts = [rng.choice(pool) for _ in range(rng.randint(1, max_clauses))]
        text, mentions, offset = "", [], 0
        for part in parts:
            mentions.extend(Mention(m.label, m.text, m.start + offset, m.end + offset) for m in part.mentions)
            text += part.text
            offset = len(text)
        if noise > 0:
            inside = set(i for m in mentions for i in range(m.start, m.end))
            text = "".join(
                noise_rng.choice(chars) if i not in inside and noise_rng.random() < noise else ch
                for i, ch in enumerate(text)
            )
        out.append(GoldText(text, tuple(mentions), f"mix#{k}"))
    return out


@registry.readers("spacy_medllm.StrategyRecords.v1")
def make_strategy_records(
    path: str,
    strategy: Any,
    scheme: Union[str, Dict[str, Any]] = "cmeee",
    spans_key: str = DEFAULT_SPANS_KEY,
    limit: int = 0,
    mixed_texts: int = 0,
    noise: float = 0.0,
    seed: int = 0,
) -> List[ChatRecord]:
    """Instruction records built in memory from a gold corpus (``.spacy`` or a corpus file)
    by ``strategy``; ``limit`` > 0 reads only that many texts; ``mixed_texts`` adds that
    many synthetic texts made of the corpus's clauses, ``noise`` of their characters
    outside mentions replaced (:func:`mix_clauses`)."""
    from ..labels import get_scheme

    texts = read_gold_texts(path, spans_key, limit)
    texts += mix_clauses(texts, mixed_texts, seed, noise=noise)
    return strategy_records(texts, strategy, get_scheme(scheme))


@dataclass
class Encoded:
    """Token ids of one record and its labels (prompt positions are ``IGNORE_INDEX``)."""

    input_ids: List[int]
    labels: List[int]
    source: str
    n_entities: Optional[int] = None
    truncated: bool = False


def encode_chat(tokenizer, record: ChatRecord, stop_ids: Sequence[int]) -> Encoded:
    """Tokenise a record through the chat template, with labels on the answer only.

    prompt = template(messages before the answer, add_generation_prompt=True); the
    answer's tokens are what the full conversation adds after the prompt, up to and
    including the first stop token (``generation.stop_token_ids``: the template's
    trailing newline is not learned; the tokenizer's EOS is appended when the template
    writes none). When the prompt's tokens are not a prefix of the full conversation's (a
    merge across the boundary), the two parts are tokenised separately and concatenated,
    which is what generation sees: it starts from the prompt's tokens. A BOS is put first
    exactly when the generator puts one first.
    """
    messages = record.as_messages()
    prompt_text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)

    def ids(text: str) -> List[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    prompt_ids = ids(prompt_text)
    bos = default_bos(tokenizer)
    if bos is not None and (not prompt_ids or prompt_ids[0] != bos):
        prompt_ids = [bos] + prompt_ids
        full_text, prompt_text = tokenizer.bos_token + full_text, tokenizer.bos_token + prompt_text
    if full_text.startswith(prompt_text):
        full_ids = ids(full_text)
        if full_ids[: len(prompt_ids)] == prompt_ids:
            answer = full_ids[len(prompt_ids) :]
        else:
            answer = ids(full_text[len(prompt_text) :])
    else:
        # The template renders a finished turn differently from a generation prompt
        # (e.g. it drops reasoning): learn the answer text right after the prompt.
        answer = ids(messages[-1]["content"])
    stops = set(stop_ids)
    cut = next((i for i, t in enumerate(answer) if t in stops), None)
    if cut is not None:
        answer = answer[: cut + 1]
    else:
        answer = answer + [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else stop_ids[0]]
    return Encoded(
        input_ids=prompt_ids + answer,
        labels=[IGNORE_INDEX] * len(prompt_ids) + answer,
        source=record.source,
        n_entities=record.n_entities,
    )


def default_bos(tokenizer) -> Optional[int]:
    """The BOS id when the tokenizer puts one before plain text (Llama 2 style), else None;
    the same rule as the generator's, so training and generation see the same prompt."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None and bos in tokenizer("a").input_ids else None


def apply_cutoff(encoded: Sequence[Encoded], cutoff_len: int, overlong: str) -> Tuple[List[Encoded], Dict[str, int]]:
    """Truncate or skip records longer than ``cutoff_len``; a record whose prompt alone
    fills the cutoff has nothing left to learn and is skipped either way."""
    kept: List[Encoded] = []
    counts = {"truncated": 0, "skipped": 0}
    for enc in encoded:
        if len(enc.input_ids) <= cutoff_len:
            kept.append(enc)
            continue
        n_prompt = sum(1 for label in enc.labels if label == IGNORE_INDEX)
        if overlong == "skip" or n_prompt >= cutoff_len - 1:
            counts["skipped"] += 1
            continue
        counts["truncated"] += 1
        kept.append(
            Encoded(enc.input_ids[:cutoff_len], enc.labels[:cutoff_len], enc.source, enc.n_entities, truncated=True)
        )
    return kept, counts


def epoch_batches(
    lengths: Sequence[int],
    negatives: Sequence[bool],
    *,
    batch_size: int,
    bucket_batches: int,
    negative_ratio: float,
    seed: int,
    epoch: int,
) -> List[List[int]]:
    """The batches (record indices) of one epoch; a pure function of the seed and the
    epoch number, so a resumed run replays exactly the batches it would have seen."""
    import numpy as np

    rng = np.random.default_rng([seed, epoch])
    indices = np.arange(len(lengths))
    if negative_ratio < 1.0:
        neg = indices[np.asarray(negatives, dtype=bool)]
        keep_neg = rng.choice(neg, size=int(round(negative_ratio * len(neg))), replace=False)
        indices = np.sort(np.concatenate([indices[~np.asarray(negatives, dtype=bool)], keep_neg]))
    order = rng.permutation(indices)
    chunk = batch_size * bucket_batches
    batches: List[List[int]] = []
    for lo in range(0, len(order), chunk):
        part = sorted(order[lo : lo + chunk].tolist(), key=lambda i: (lengths[i], i))
        batches.extend(part[j : j + batch_size] for j in range(0, len(part), batch_size))
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


def collate(examples: Sequence[Encoded], pad_id: int) -> Dict[str, Any]:
    """The ``Trainer``'s batch: right-padded ``input_ids``, ``attention_mask`` and the
    response-only ``labels``."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e.input_ids)
        ids[r, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[r, :n] = 1
        labels[r, :n] = torch.tensor(e.labels, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def token_weight_vector(tokenizer, weights: Dict[str, float], vocab_size: int):
    """Per-vocabulary-id loss weights: a token whose text contains a key gets that key's
    weight (the largest when several match); every other token 1.0."""
    import torch

    vector = torch.ones(vocab_size)
    if not weights:
        return vector
    tokens = tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), vocab_size))))
    matched = {key: 0 for key in weights}
    for tid, tok in enumerate(tokens):
        if tok is None or tid in tokenizer.all_special_ids:
            continue
        hits = [w for key, w in weights.items() if key in tok]
        for key in weights:
            matched[key] += key in tok
        if hits:
            vector[tid] = max(hits)
    missing = [k for k, n in matched.items() if not n]
    if missing:
        raise SFTError(f"token_weights keys {missing} occur in no token of the vocabulary.")
    return vector
