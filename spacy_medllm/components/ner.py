"""``medllm_ner``: the generator. Prompts a local causal LM with an annotation strategy and
writes the parsed *mentions* (not spans) to ``doc._.llm_mentions[<component name>]``;
``medllm_align`` turns them into spans.

The model is loaded lazily on first use, so a pipeline can be built, saved and loaded on a
machine where the configured base path does not exist yet (``from_disk`` points it at the
copy stored with the pipeline).
"""
import json
import logging
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Union

from spacy.language import Language
from spacy.tokens import Doc
from spacy.util import ensure_path, minibatch

from ..embedded import resolve_model_path
from ..errors import MedLLMLoadError
from ..extensions import LLM_IO, LLM_MENTIONS, LLM_SEARCH_TEXT, per_generator
from ..labels import LabelScheme
from ..llm.backends import open_generator
from ..llm.generation import HFGenerator
from ..llm.loader import LoadedLM, ModelSpec
from ..llm.server import ServerGenerator, ServerSpec
from ..recognizer import Recognizer, RecognizerSettings
from ..safety import check_links, copy_file, copy_tree
from ..strategies.base import Strategy
from ..types import stored_mentions

logger = logging.getLogger("spacy_medllm")

# A base model whose weights are smaller than this is copied into a saved pipeline when
# ``copy_base`` is left on "auto"; larger ones are referenced by path.
AUTO_COPY_LIMIT_BYTES = 200 * 1024 * 1024
# a batch with more prompts than this is logged with its size (long documents are costly)
LONG_BATCH_PROMPTS = 1000
# A custom prompt template is stored with the pipeline under this name.
TEMPLATE_FILE = "template.jinja"


@Language.factory(
    "medllm_ner",
    default_config={
        "model": {"@misc": "spacy_medllm.ModelSpec.v1", "path": "embedded"},
        "adapter": None,
        "strategy": {"@misc": "spacy_medllm.SymbolStrategy.v1"},
        "labels": {"@misc": "spacy_medllm.LabelScheme.v1", "scheme": "cmeee"},
        "recognizer": {"@misc": "spacy_medllm.Recognizer.v1"},
        "batch_size": 16,
        "rows_per_call": 16,
        "max_doc_chars": None,
        "save_io": False,
        "copy_base": "auto",
    },
    assigns=[f"doc._.{LLM_MENTIONS}", f"doc._.{LLM_SEARCH_TEXT}", f"doc._.{LLM_IO}"],
)
def make_medllm_ner(
    nlp: Language,
    name: str,
    model: Union[ModelSpec, ServerSpec],
    adapter: Optional[str],
    strategy: Strategy,
    labels: LabelScheme,
    recognizer: RecognizerSettings,
    batch_size: int,
    rows_per_call: int,
    max_doc_chars: Optional[int],
    save_io: bool,
    copy_base: Any,
) -> "MedLLMNer":
    """The generator. ``model``: where the base LM lives (``path = "embedded"`` is the tiny
    CMeEE model shipped with the package), or a served model (``spacy_medllm.OpenAIServer.v1``);
    ``adapter``: a peft adapter directory (in-process models; a served adapter is named
    in the server block); ``strategy`` and ``labels``: how to prompt and parse;
    ``recognizer``: sharding, normalisation, the copy constraint and the generation budget
    (``spacy_medllm.Recognizer.v1``, the block the spacy-llm task and the dev evaluator take);
    ``batch_size``: documents per batch; ``rows_per_call``: prompts per model call of an
    in-process model (a server batches by itself); ``max_doc_chars``: skip (and count)
    documents longer than this instead of spending a prompt per type on each of their
    shards (null: no limit); ``copy_base``: store the base weights in a saved pipeline
    (true / false / "auto" = when smaller than 200 MB)."""
    return MedLLMNer(
        nlp,
        name,
        model=model,
        adapter=adapter,
        recognizer=Recognizer(strategy, labels, recognizer),
        batch_size=batch_size,
        rows_per_call=rows_per_call,
        save_io=save_io,
        copy_base=copy_base,
        max_doc_chars=max_doc_chars,
    )


class MedLLMNer:
    def __init__(
        self,
        nlp: Language,
        name: str,
        *,
        model: Union[ModelSpec, ServerSpec],
        adapter: Optional[str],
        recognizer: Recognizer,
        batch_size: int,
        rows_per_call: int,
        save_io: bool,
        copy_base: Any,
        max_doc_chars: Optional[int] = None,
    ) -> None:
        if copy_base not in (True, False, "auto"):
            raise ValueError(f"copy_base must be true, false or \"auto\", not {copy_base!r}")
        if isinstance(model, ServerSpec) and adapter is not None:
            raise ValueError(
                f"{name}: adapter={adapter!r} is for models loaded in-process; serve it with the model "
                "(vLLM: --lora-modules NAME=PATH) and set model = NAME in the OpenAIServer block."
            )
        self.nlp = nlp
        self.name = name
        self.spec = model
        self.adapter = adapter
        self.recognizer = recognizer
        self.batch_size = batch_size
        self.rows_per_call = rows_per_call
        self.save_io = save_io
        self.copy_base = copy_base
        self.max_doc_chars = max_doc_chars
        self.stats: Counter = Counter()
        self._lm: Optional[LoadedLM] = None
        self._adapter_name: Optional[str] = None
        self._server: Optional[ServerGenerator] = None

    # -- model ---------------------------------------------------------------------------
    @property
    def lm(self) -> LoadedLM:
        """The loaded model (shared with every component configured with the same spec)."""
        if isinstance(self.spec, ServerSpec):
            raise MedLLMLoadError(f"{self.name}: the model is served at {self.spec.base_url}, not loaded here.")
        if self._lm is None:
            generator = open_generator(replace(self.spec, path=str(resolve_model_path(self.spec.path))), self.adapter)
            self._lm, self._adapter_name = generator.lm, generator.adapter
            self._use_model_template(generator)
        return self._lm

    def _use_model_template(self, generator: Union[HFGenerator, ServerGenerator]) -> None:
        """Prompt the model the way it was fine-tuned (the template its folder carries)
        when the strategy was given no template."""
        strategy = self.recognizer.strategy
        if getattr(strategy, "template", "no templates") is not None:
            return
        template = generator.prompt_template()
        if template is not None:
            strategy.use_template(template)
            logger.info("%s: prompting with the template %s", self.name, template)

    @property
    def generator(self) -> Union[HFGenerator, ServerGenerator]:
        if isinstance(self.spec, ServerSpec):
            if self._server is None:
                self._server = ServerGenerator(self.spec)
                self._use_model_template(self._server)
            return self._server
        return HFGenerator(self.lm, self._adapter_name)

    # -- processing ----------------------------------------------------------------------
    def __call__(self, doc: Doc) -> Doc:
        return next(iter(self.pipe([doc])))

    def pipe(self, stream: Iterable[Doc], *, batch_size: Optional[int] = None) -> Iterator[Doc]:
        # nlp.pipe passes its own batch_size (1,000 by default); the component's bounds how many
        # documents wait for the first answer
        size = min(batch_size or self.batch_size, self.batch_size)
        for docs in minibatch(stream, size=size):
            yield from self._process(list(docs))

    def _process(self, docs: List[Doc]) -> List[Doc]:
        kept = []
        for doc in docs:
            if self.max_doc_chars and len(doc.text) > self.max_doc_chars:
                per_generator(doc, LLM_MENTIONS)[self.name] = []
                self.stats["skipped_long_docs"] += 1
                logger.warning(
                    "%s: skipped a document of %d characters (max_doc_chars=%d)", self.name, len(doc.text), self.max_doc_chars
                )
            else:
                kept.append(doc)
        if kept:
            self._recognize(kept)
        return docs

    def _recognize(self, docs: List[Doc]) -> None:
        texts = [doc.text for doc in docs]
        generator = self.generator
        tokenizer = generator.tokenizer
        # without a local tokenizer a served model gets chat messages and applies its template
        jobs = self.recognizer.plan(
            texts, (lambda prompt: prompt.chat_text(tokenizer)) if tokenizer is not None else (lambda prompt: prompt.messages())
        )
        if len(jobs) > LONG_BATCH_PROMPTS:
            logger.info("%s: %d prompts for %d documents (%d characters)", self.name, len(jobs), len(docs), sum(map(len, texts)))
        results = generator.generate([job.request for job in jobs], batch_size=self.rows_per_call) if jobs else []
        recognitions = self.recognizer.read(texts, jobs, results, save_io=self.save_io)
        self.stats["prompts"] += len(jobs)
        self.stats["forward_passes"] += sum(r.forward_passes for r in results)
        self.stats["generated_tokens"] += sum(r.generated_tokens for r in results)
        for doc, rec in zip(docs, recognitions):
            per_generator(doc, LLM_MENTIONS)[self.name] = stored_mentions(rec.mentions)
            if self.recognizer.normalize:
                per_generator(doc, LLM_SEARCH_TEXT)[self.name] = self.recognizer.search_text(doc.text)
            if self.save_io:
                per_generator(doc, LLM_IO)[self.name] = rec.io
            self.stats["mentions"] += len(rec.mentions)
            for reason, n in rec.discarded.items():
                self.stats[f"discarded_{reason}"] += n
            if rec.discarded:
                logger.info("%s: discarded parts of responses for a doc: %s", self.name, dict(rec.discarded))

    # -- serialization -------------------------------------------------------------------
    def to_disk(self, path, *, exclude=tuple()) -> None:
        """Store the adapter (and the base weights when ``copy_base`` says so) beside a
        ``cfg`` that records what was stored."""
        path = ensure_path(path)
        path.mkdir(parents=True, exist_ok=True)
        if isinstance(self.spec, ServerSpec):  # the config holds all of it
            self._save_template(path, {"server": self.spec.base_url})
            return
        base = resolve_model_path(self.spec.path)
        cfg: Dict[str, Any] = {"base_path": str(base), "base_copied": False, "adapter_copied": False}
        if self._should_copy_base(base):
            _copy_dir(base, path / "model")
            cfg["base_copied"] = True
        if self.adapter is not None:
            _copy_dir(Path(self.adapter), path / "adapter")
            cfg["adapter_copied"] = True
        self._save_template(path, cfg)

    def _save_template(self, path: Path, cfg: Dict[str, Any]) -> None:
        template = getattr(self.recognizer.strategy, "template", None)
        if template:
            _copy_file(Path(template), path / TEMPLATE_FILE)
            cfg["template_copied"] = True
        (path / "cfg").write_text(json.dumps(cfg, indent=2), encoding="utf8")

    def from_disk(self, path, *, exclude=tuple()) -> "MedLLMNer":
        path = ensure_path(path)
        check_links(path)
        cfg = json.loads((path / "cfg").read_text(encoding="utf8"))
        if cfg.get("base_copied"):
            self.spec = replace(self.spec, path=str(path / "model"))
        elif "base_path" in cfg and not Path(cfg["base_path"]).exists() and not Path(self.spec.path).exists():
            logger.warning(
                "%s: the base model was saved by reference (%s) and is not on this machine; "
                "set [components.%s.model] path before running the pipeline.",
                self.name, cfg["base_path"], self.name,
            )
        if cfg.get("adapter_copied"):
            self.adapter = str(path / "adapter")
        if cfg.get("template_copied"):
            self.recognizer.strategy.use_template(str(path / TEMPLATE_FILE))
        self._lm = None
        self._server = None
        return self

    def _should_copy_base(self, base: Path) -> bool:
        if self.copy_base == "auto":
            return _weights_size(base) < AUTO_COPY_LIMIT_BYTES
        return bool(self.copy_base)


def _weights_size(path: Path) -> int:
    if not path.is_dir():
        raise MedLLMLoadError(f"The base model directory {path} does not exist, so it cannot be saved.")
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin"))


def _copy_file(src: Path, dst: Path) -> None:
    if not src.is_file():
        raise ValueError(f"The prompt template {src} does not exist, so it cannot be saved with the pipeline.")
    if src.resolve() != dst.resolve():
        copy_file(src, dst)


def _copy_dir(src: Path, dst: Path) -> None:
    if src.resolve() != dst.resolve():
        copy_tree(src, dst)
