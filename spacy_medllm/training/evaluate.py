"""Dev-set evaluation of a fine-tuned generator, for the trainer's per-epoch callback.

The trainer only needs an :data:`~.sft.Evaluator`: ``evaluate(model_dir) -> dict`` with a
score under the trainer's ``score_key`` (``"f"`` here). :class:`GenerationEvaluator` is the
default: it loads the saved model (full weights, or base + adapter), builds the strategy's
prompts for every dev text, generates greedily (copy-constrained when the strategy offers
a constraint), parses with the strategy and scores strict micro P/R/F1 on character
offsets. Once the ``medllm_ner`` / ``medllm_align`` components exist, an evaluator that
runs the pipeline has the same signature and can replace this one in the config.
"""
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import srsly
from spacy.util import registry
from tqdm import tqdm

from .. import DEFAULT_SPANS_KEY
from ..labels import LabelScheme, get_scheme
from ..alignment import place_mention
from ..llm.generation import HFGenerator
from ..errors import MedLLMLoadError
from ..llm.loader import LoadedLM, ModelSpec, clear_cache, load_lm
from ..recognizer import Recognizer, RecognizerSettings
from ..scoring import CharSpan, SpanScores, add_span_sets
from ..strategies.base import Strategy
from .sft_data import read_gold_texts

ADAPTER_NAME = "sft"
EVAL_CHUNK_BATCHES = 8  # batches of prompts per generation call between progress updates


@dataclass(frozen=True)
class DevExample:
    """A dev text and its gold entities as character spans."""

    text: str
    gold: frozenset
    source: str = ""


def read_dev_examples(path: Union[str, Path], spans_key: str = DEFAULT_SPANS_KEY, limit: int = 0) -> List[DevExample]:
    """Dev texts and gold spans from a ``.spacy`` file or a corpus file (see
    :func:`~.sft_data.read_gold_texts`)."""
    return [
        DevExample(g.text, frozenset(CharSpan(m.start, m.end, m.label) for m in g.mentions), g.source)
        for g in read_gold_texts(path, spans_key, limit)
    ]


def load_trained(model_dir: Union[str, Path], base: Optional[ModelSpec] = None) -> Tuple[LoadedLM, Optional[str]]:
    """The model saved by the trainer: full weights, or ``base`` (default: the base the
    adapter names) with the adapter at ``model_dir`` added as ``"sft"``. Returns the
    loaded model and the adapter name (None for full weights)."""
    model_dir = Path(model_dir)
    adapter_config = model_dir / "adapter_config.json"
    if not adapter_config.exists():
        spec = ModelSpec(path=str(model_dir)) if base is None else replace(base, path=str(model_dir))
        return load_lm(spec), None
    if base is None:
        base_path = srsly.read_json(adapter_config).get("base_model_name_or_path")
        if not base_path:
            raise MedLLMLoadError(f"{adapter_config} names no base model; give the evaluator a base ModelSpec.")
        base = ModelSpec(path=base_path)
    lm = load_lm(base)
    lm.add_adapter(ADAPTER_NAME, str(model_dir))
    return lm, ADAPTER_NAME


class GenerationEvaluator:
    """Strict micro P/R/F1 of a saved generator on dev texts (see the module docstring).

    ``settings``: prompting and decoding, the block ``medllm_ner`` serves with
    (:class:`~spacy_medllm.recognizer.RecognizerSettings`), so a checkpoint is selected
    under the rules it will be served with; ``rows_per_call``: prompts per model call.
    ``base``: how to load the base model of an adapter (e.g. 4-bit for QLoRA); default the
    base path the adapter names, with default loading settings.
    """

    def __init__(
        self,
        examples: Sequence[DevExample],
        strategy: Strategy,
        scheme: LabelScheme,
        *,
        settings: RecognizerSettings = RecognizerSettings(),
        rows_per_call: int = 32,
        base: Optional[ModelSpec] = None,
        progress_bar: bool = True,
    ) -> None:
        if not examples:
            raise ValueError("The dev set is empty.")
        self.examples = list(examples)
        self.strategy = strategy
        self.scheme = scheme
        self.settings = settings
        self.rows_per_call = rows_per_call
        self.base = base
        self.progress_bar = progress_bar

    def __call__(self, model_dir: Union[str, Path]) -> Dict[str, Any]:
        start = time.perf_counter()
        lm, adapter = load_trained(model_dir, self.base)
        try:
            predictions, discarded = self.predict(HFGenerator(lm, adapter))
        finally:
            clear_cache()  # the next call loads new weights from the same path
        scores = self.score(predictions)
        scores["discarded"] = dict(discarded)
        scores["seconds"] = time.perf_counter() - start
        return scores

    def predict(self, generator) -> Tuple[List[Set[CharSpan]], Counter]:
        """Predicted character spans per dev example, and the parser's discard counts:
        the generator's own prompting and parsing (:class:`~spacy_medllm.recognizer.Recognizer`)
        and the aligner's placement of offset-less mentions."""
        texts = [eg.text for eg in self.examples]
        recognizer = Recognizer(self.strategy, self.scheme, self.settings)
        jobs = recognizer.plan(texts, lambda prompt: prompt.messages())
        requests = [job.request for job in jobs]
        # several batches per call keep the continuous batching full; the bar shows at a terminal only
        chunk = EVAL_CHUNK_BATCHES * self.rows_per_call
        results = []
        with tqdm(total=len(requests), unit="prompt", desc="dev evaluation", disable=None if self.progress_bar else True) as bar:
            for i in range(0, len(requests), chunk):
                part = requests[i : i + chunk]
                results += generator.generate(part, batch_size=self.rows_per_call)
                bar.update(len(part))
        predictions, discarded = [], Counter()
        for text, recognition in zip(texts, recognizer.read(texts, jobs, results)):
            discarded.update(recognition.discarded)
            predictions.append(
                {
                    CharSpan(start, end, m.label)
                    for m in recognition.mentions
                    for start, end in place_mention(m, text, "nearest", discarded)
                }
            )
        return predictions, discarded

    def score(self, predictions: Sequence[Set[CharSpan]]) -> Dict[str, Any]:
        """Strict micro P/R/F1 over (start, end, label) sets, overall and per type."""
        scores = SpanScores()
        for eg, pred in zip(self.examples, predictions):
            add_span_sets(scores, set(eg.gold), pred)
        return {
            "p": scores.strict.p,
            "r": scores.strict.r,
            "f": scores.strict.f,
            "n_pred": scores.strict.n_pred,
            "n_gold": scores.strict.n_gold,
            "per_type_f": {label: prf.f for label, prf in sorted(scores.per_label.items())},
        }


@registry.misc("spacy_medllm.GenerationEvaluator.v2")
def make_generation_evaluator(
    path: str,
    strategy: Strategy,
    scheme: Union[str, Dict[str, Any]] = "cmeee",
    recognizer: Optional[RecognizerSettings] = None,
    spans_key: str = DEFAULT_SPANS_KEY,
    limit: int = 0,
    rows_per_call: int = 32,
    base: Optional[ModelSpec] = None,
    progress_bar: bool = True,
) -> GenerationEvaluator:
    """The default dev evaluator (``[evaluation]`` block of a ``train-llm`` config).

    ``recognizer``: the ``spacy_medllm.Recognizer.v1`` block (give it the pipeline's
    settings; its defaults when left out); ``limit`` > 0 scores only the first that many
    dev texts (quicker epochs). v2: the decoding settings moved into ``recognizer``.
    """
    return GenerationEvaluator(
        read_dev_examples(path, spans_key, limit),
        strategy,
        get_scheme(scheme),
        settings=recognizer or RecognizerSettings(),
        rows_per_call=rows_per_call,
        base=base,
        progress_bar=progress_bar,
    )


__all__ = ["DevExample", "read_dev_examples", "load_trained", "GenerationEvaluator", "ADAPTER_NAME"]
