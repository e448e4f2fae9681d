"""``python -m spacy medllm build-instructions``: the instruction-tuning set of a strategy
from gold ``.spacy`` files, as JSONL in Alpaca form and in chat-messages form (what
LLaMA-Factory and most SFT trainers read), one record per prompt with its entity count,
and LLaMA-Factory's ``dataset_info.json`` for both files.

LLaMA-Factory joins an Alpaca record's instruction and input with one newline and reads a
system prompt only from a declared column, while ``medllm_ner`` sends ``system`` and
``instruction`` + blank line + ``input``: so the Alpaca entry of ``dataset_info.json``
reads the whole user message from the record's ``user`` field and declares ``system``, and
an adapter trained on either file sees the prompts ``medllm_ner`` sends."""
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import srsly
from spacy.cli._util import Arg, Opt
from spacy.tokens import Doc, DocBin
from spacy.util import registry
from spacy.vocab import Vocab
from tqdm import tqdm
from wasabi import msg

from .. import DEFAULT_SPANS_KEY
from ..labels import LabelScheme, get_scheme
from ..strategies import STRATEGIES, BaseStrategy, InContextStrategy, TfidfRetriever, mentions_from_doc
from .app import medllm_cli


@dataclass
class InstructionStats:
    docs: int = 0
    records: int = 0
    entities: int = 0
    prompt_size: int = 0  # tokens with a tokenizer, else characters
    response_size: int = 0
    max_record_size: int = 0
    unit: str = "chars"
    skipped: Counter = field(default_factory=Counter)  # gold mentions left out, by "reason: label"

    def line(self) -> str:
        return (
            f"records {self.records}, docs {self.docs}, entities {self.entities}, "
            f"{self.unit} {self.prompt_size + self.response_size} (prompts {self.prompt_size}, "
            f"responses {self.response_size}, longest record {self.max_record_size})"
        )


def make_strategy(
    name: str, demos: Optional[Path] = None, base: str = "json", k: int = 3, spans_key: str = DEFAULT_SPANS_KEY,
    template: Optional[Path] = None,
) -> BaseStrategy:
    """A strategy from its short name (``symbol``, ``json``, …, ``incontext``) or its
    registered name; ``incontext`` wraps ``base`` with ``k`` demonstrations from ``demos``.
    ``template``: a prompt template file (Jinja, the macros of the builtin ones) for the
    strategy (for ``incontext``, its base)."""
    if template is not None and not Path(template).is_file():
        raise ValueError(f"Prompt template {template} does not exist")
    if name == "incontext":
        if demos is None:
            raise ValueError("The incontext strategy needs --demos, a .spacy file to retrieve demonstrations from")
        retriever = TfidfRetriever(path=str(demos), spans_key=spans_key)
        return InContextStrategy(make_strategy(base, template=template), retriever, k=k)
    registered = STRATEGIES.get(name.replace("-", "_"), name)
    if registered not in registry.misc:
        raise ValueError(f"Unknown strategy {name!r}; choose one of {', '.join([*STRATEGIES, 'incontext'])} or a registered name")
    return registry.misc.get(registered)(**({"template": str(template)} if template is not None else {}))


def build_records(
    docs: Iterable[Doc],
    strategy: BaseStrategy,
    scheme: LabelScheme,
    spans_key: str = DEFAULT_SPANS_KEY,
    tokenizer: Any = None,
) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]], InstructionStats]:
    """Alpaca records, messages records and stats for ``docs`` (one record per prompt,
    with ``n_entities``, the entities its answer marks, which ``negative_ratio`` needs;
    an Alpaca record also carries the whole ``user`` message, see the module docstring).
    Gold mentions of a type the scheme lacks are left out and counted."""
    stats = InstructionStats(unit="tokens" if tokenizer is not None else "chars")
    alpaca: List[Dict[str, Any]] = []
    messages: List[Dict[str, Any]] = []
    for doc in docs:
        stats.docs += 1
        gold = []
        for m in mentions_from_doc(doc, spans_key):
            if m.label in scheme:
                gold.append(m)
            else:
                stats.skipped[f"label not in scheme {scheme.name!r}: {m.label}"] += 1
        stats.entities += len({(m.label, m.start, m.end) for m in gold})
        for prompt in strategy.prompts(doc.text, scheme):
            response = strategy.render_target(doc.text, gold, prompt)
            n_entities = len(strategy.target_mentions(doc.text, gold, prompt))
            alpaca.append({**prompt.alpaca(response), "user": prompt.user, "n_entities": n_entities})
            messages.append({"messages": prompt.messages(response), "n_entities": n_entities})
            if tokenizer is None:
                prompt_size = len(prompt.system) + len(prompt.user)
                full_size = prompt_size + len(response)
            else:
                prompt_size = _count_tokens(tokenizer, prompt.chat_text(tokenizer))
                full_size = _count_tokens(tokenizer, prompt.chat_text(tokenizer, response))
            stats.records += 1
            stats.prompt_size += prompt_size
            stats.response_size += full_size - prompt_size
            stats.max_record_size = max(stats.max_record_size, full_size)
    return alpaca, messages, stats


def _count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def write_dataset_info(output_dir: Path, alpaca_path: Path, messages_path: Path) -> Path:
    """Add the two files to ``output_dir/dataset_info.json`` (LLaMA-Factory's dataset
    list, kept with the entries of other splits); named after the files without
    ``.jsonl``, e.g. ``--dataset cmeee_train.symbol.messages``."""
    path = output_dir / "dataset_info.json"
    info = srsly.read_json(path) if path.exists() else {}
    info[alpaca_path.name[: -len(".jsonl")]] = {
        "file_name": alpaca_path.name,
        "formatting": "alpaca",
        "columns": {"prompt": "user", "response": "output", "system": "system"},
    }
    info[messages_path.name[: -len(".jsonl")]] = {
        "file_name": messages_path.name,
        "formatting": "sharegpt",
        "columns": {"messages": "messages"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                 "system_tag": "system"},
    }
    srsly.write_json(path, info)
    return path


@medllm_cli.command("build-instructions", short_help="Instruction data (Alpaca and messages JSONL) for a strategy")
def build_instructions_cli(
    # fmt: off
    input_path: Path = Arg(..., help="Gold .spacy file", exists=True, dir_okay=False),
    output_dir: Path = Arg(..., help="Output directory"),
    strategy: str = Opt("symbol", "--strategy", "-s", help="symbol, json, html, index, mark, entity_category, incontext, or a registered name"),
    scheme: str = Opt("cmeee", "--scheme", help="Builtin label scheme (cmeee, ccks2019, rocling, ncbi, bc5cdr, bc2gm) or a JSON file"),
    spans_key: str = Opt(DEFAULT_SPANS_KEY, "--spans-key", "-sk", help="doc.spans key of the gold entities"),
    tokenizer_path: Optional[Path] = Opt(None, "--tokenizer", "-t", help="Local Hugging Face tokenizer: count tokens through its chat template"),
    demos: Optional[Path] = Opt(None, "--demos", help="incontext: .spacy file to retrieve demonstrations from"),
    base: str = Opt("json", "--base", help="incontext: the strategy that gives the answer format"),
    k: int = Opt(3, "--k", help="incontext: demonstrations per prompt"),
    template: Optional[Path] = Opt(None, "--template", help="Custom prompt template (Jinja file with the macros of the builtin ones)", dir_okay=False),
    progress: bool = Opt(True, "--progress/--no-progress", help="Show a progress bar (documents, rate, ETA)"),
    # fmt: on
):
    """Write OUTPUT_DIR/<stem>.<strategy>.alpaca.jsonl and .messages.jsonl from gold docs,
    and their entries in OUTPUT_DIR/dataset_info.json (LLaMA-Factory's dataset list)."""
    try:
        label_scheme = get_scheme(scheme)
        chosen = make_strategy(strategy, demos=demos, base=base, k=k, spans_key=spans_key, template=template)
    except ValueError as err:
        msg.fail(str(err), exits=1)
    tokenizer = None
    if tokenizer_path is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path), trust_remote_code=False)
    doc_bin = DocBin().from_disk(input_path)
    docs = tqdm(doc_bin.get_docs(Vocab()), total=len(doc_bin), unit="doc", desc="build-instructions", disable=not progress)
    alpaca, messages, stats = build_records(docs, chosen, label_scheme, spans_key, tokenizer)
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{input_path.stem}.{chosen.name}"
    alpaca_path, messages_path = output_dir / f"{stem}.alpaca.jsonl", output_dir / f"{stem}.messages.jsonl"
    srsly.write_jsonl(alpaca_path, alpaca)
    srsly.write_jsonl(messages_path, messages)
    info_path = write_dataset_info(output_dir, alpaca_path, messages_path)
    for reason, count in sorted(stats.skipped.items()):
        msg.warn(f"{count} gold mentions skipped ({reason})")
    if stats.docs and not stats.entities:
        msg.warn(f"No gold entities under doc.spans[{spans_key!r}] or doc.ents in {input_path}")
    if messages and not messages[0]["messages"][0]["content"]:
        msg.warn("The prompts have an empty system message: LLaMA-Factory's templates put their default system prompt there")
    msg.good(f"Wrote {alpaca_path} and {messages_path}, listed in {info_path}")
    msg.text(stats.line())
