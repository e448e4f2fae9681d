"""``medllm_cls``: the LLM-CLS filter. Scores every span of a group with the classifier
(``spacy_medllm.llm.cls_head``) and drops the spans it rejects.

Each span is shown to the classifier in its sentence (the sentences it covers; the whole
text when the doc has no sentence boundaries), as in training. A span is kept when
P(correct) >= ``threshold``. The kept spans go back to ``doc.spans[spans_key]`` with:

- ``attrs["scores"]``: the classifier's probabilities (the spancat convention: the score
  is the probability that the span is right; ``flat_policy = "score"`` and the ensemble
  then rank by it);
- ``attrs["generator_scores"]``: the scores the group had before the filter (the
  generator's), when it had them.

The classifier is loaded on first use, so ``spacy.load`` does not need the path the
pipeline was built with; ``to_disk`` stores a copy of the classifier (head, adapter or
weights, tokenizer, settings), never the base model of a LoRA classifier, which is loaded
through the shared loader: a generator and the filter on one base hold one copy.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from spacy.language import Language
from spacy.tokens import Doc
from spacy.training import Example
from spacy.util import minibatch
from tqdm import tqdm

from .. import DEFAULT_SPANS_KEY
from ..llm.cls_head import SpanClassifier, load_classifier
from ..llm.loader import ModelSpec
from ..safety import check_links, copy_tree
from ..scoring import PRF, SCORE_WEIGHTS
from ..spans import FLAT_POLICIES, set_spans, span_context

GENERATOR_SCORES = "generator_scores"


@Language.factory(
    "medllm_cls",
    default_config={
        "model": None,
        "base": None,
        "spans_key": DEFAULT_SPANS_KEY,
        "threshold": 0.5,
        "batch_size": 32,
        "flat_policy": "longest",
        "scorer": {"@scorers": "spacy_medllm.span_scorer.v1", "spans_key": DEFAULT_SPANS_KEY},
    },
    assigns=["doc.spans", "doc.ents"],
    default_score_weights=SCORE_WEIGHTS,
)
def make_medllm_cls(
    nlp: Language,
    name: str,
    model: Optional[str],
    base: Optional[ModelSpec],
    spans_key: str,
    threshold: float,
    batch_size: int,
    flat_policy: Optional[str],
    scorer: Optional[Callable],
) -> "MedLLMClassifierFilter":
    """``model``: a classifier directory written by ``train-cls``; ``base``: the base model
    spec of a LoRA classifier when it differs from the one saved with it (e.g. the
    generator's, to share one copy); ``threshold``: the least P(correct) a span needs;
    ``flat_policy``: how ``doc.ents`` is chosen (None leaves doc.ents alone)."""
    return MedLLMClassifierFilter(name, model, base, spans_key, threshold, batch_size, flat_policy, scorer)


class MedLLMClassifierFilter:
    def __init__(
        self,
        name: str,
        model: Optional[Union[str, Path]],
        base: Optional[ModelSpec] = None,
        spans_key: str = DEFAULT_SPANS_KEY,
        threshold: float = 0.5,
        batch_size: int = 32,
        flat_policy: Optional[str] = "longest",
        scorer: Optional[Callable] = None,
    ):
        if flat_policy is not None and flat_policy not in FLAT_POLICIES:
            raise ValueError(f"{name}: flat_policy must be one of {FLAT_POLICIES} or null, not {flat_policy!r}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"{name}: threshold must be in [0, 1], not {threshold}")
        if batch_size < 1:
            raise ValueError(f"{name}: batch_size must be positive, not {batch_size}")
        self.name = name
        self.model_path = Path(model) if model is not None else None
        self.base = base
        self.spans_key = spans_key
        self.threshold = threshold
        self.batch_size = batch_size
        self.flat_policy = flat_policy
        self.scorer = scorer
        self._classifier: Optional[SpanClassifier] = None

    @property
    def classifier(self) -> SpanClassifier:
        if self._classifier is None:
            if self.model_path is None:
                raise ValueError(
                    f"{self.name}: no classifier configured. Set `model` to a directory written by "
                    "`python -m spacy medllm train-cls`, or load a pipeline saved with one."
                )
            self._classifier = load_classifier(self.model_path, base=self.base)
        return self._classifier

    def __call__(self, doc: Doc) -> Doc:
        return next(iter(self.pipe([doc])))

    def pipe(self, stream: Iterable[Doc], batch_size: Optional[int] = None) -> Iterator[Doc]:
        """Score the spans of several docs together, ``batch_size`` docs at a time."""
        for docs in minibatch(stream, size=batch_size or self.batch_size):
            probs = self.score_docs(docs)
            for doc, doc_probs in zip(docs, probs):
                self.filter_doc(doc, doc_probs)
                yield doc

    def score_docs(self, docs: Sequence[Doc]) -> List[List[float]]:
        """P(correct) of every span of each doc's group (empty for a doc without it)."""
        candidates: List[Tuple[str, int, int, str]] = []
        counts: List[int] = []
        for doc in docs:
            group = doc.spans.get(self.spans_key, [])
            for span in group:
                lo, hi = span_context(doc, span.start, span.end)
                candidates.append((doc.text[lo:hi], span.start_char - lo, span.end_char - lo, span.label_))
            counts.append(len(group))
        flat = self.classifier.predict_proba(candidates, self.batch_size) if candidates else []
        out, i = [], 0
        for n in counts:
            out.append(flat[i : i + n])
            i += n
        return out

    def filter_doc(self, doc: Doc, probs: Sequence[float]) -> Doc:
        if self.spans_key not in doc.spans:
            return doc
        group = doc.spans[self.spans_key]
        keep = [i for i, p in enumerate(probs) if p >= self.threshold]
        old_scores = group.attrs.get("scores")
        new_group = set_spans(
            doc, [group[i] for i in keep], self.spans_key, [probs[i] for i in keep], self.flat_policy
        )
        if old_scores is not None and len(old_scores) == len(probs):
            new_group.attrs[GENERATOR_SCORES] = [float(old_scores[i]) for i in keep]
        return doc

    def score(self, examples: Iterable[Example], **kwargs) -> dict:
        return self.scorer(examples, **kwargs) if self.scorer is not None else {}

    def to_disk(self, path: Union[str, Path], *, exclude: Iterable[str] = tuple()) -> None:
        path = Path(path)
        if self._classifier is not None:
            self._classifier.save(path)
        elif self.model_path is not None and self.model_path.resolve() != path.resolve():
            copy_tree(self.model_path, path)
        else:
            path.mkdir(parents=True, exist_ok=True)

    def from_disk(self, path: Union[str, Path], *, exclude: Iterable[str] = tuple()) -> "MedLLMClassifierFilter":
        path = Path(path)
        check_links(path)
        self.model_path = path if any(path.iterdir()) else None
        self._classifier = None
        return self


def find_filter(nlp: Language, name: Optional[str] = None) -> MedLLMClassifierFilter:
    """The named filter component of ``nlp``, or its only ``medllm_cls`` component."""
    if name is not None:
        component = nlp.get_pipe(name)
        if not isinstance(component, MedLLMClassifierFilter):
            raise ValueError(f"Component {name!r} is a {type(component).__name__}, not a medllm_cls filter")
        return component
    found = [c for _, c in nlp.pipeline if isinstance(c, MedLLMClassifierFilter)]
    if len(found) != 1:
        raise ValueError(f"The pipeline has {len(found)} medllm_cls components: name the one to calibrate")
    return found[0]


def best_threshold(candidates: Sequence[Tuple[float, bool]], n_gold: int) -> Tuple[float, float]:
    """The threshold that maximises strict F1, and that F1.

    ``candidates`` are ``(probability, is_gold)`` of every distinct predicted span; a span
    is kept when its probability is >= the threshold. Every observed probability is tried
    as the least kept one; the threshold returned is the midpoint between the best such
    probability and the next lower observed one (0 below the lowest), so the same choice
    survives tiny numeric differences when the probabilities are recomputed. Among equal
    F1 the higher threshold wins (fewer spans, same F1).
    """
    if not candidates:
        raise ValueError("No candidate spans to calibrate on: the generator predicted nothing on the dev docs")
    probs = sorted({p for p, _ in candidates}, reverse=True)
    correct_at = {p: 0 for p in probs}
    count_at = {p: 0 for p in probs}
    for p, is_gold in candidates:
        count_at[p] += 1
        correct_at[p] += int(is_gold)
    best = (-1.0, 0)
    tp = kept = 0
    for k, p in enumerate(probs):
        tp += correct_at[p]
        kept += count_at[p]
        f = 2 * tp / (kept + n_gold) if kept + n_gold else 0.0
        if f > best[0]:
            best = (f, k)
    f, k = best
    lower = probs[k + 1] if k + 1 < len(probs) else 0.0
    return (probs[k] + lower) / 2, f


@dataclass(frozen=True)
class Calibration:
    """The chosen threshold, and strict micro P/R/F1 on the dev examples with the filter at
    that threshold and without it (every candidate kept): what the filter is worth there."""

    threshold: float
    filtered: Tuple[float, float, float]
    unfiltered: Tuple[float, float, float]
    n_candidates: int
    n_kept: int
    n_gold: int


def _prf(candidates: Sequence[Tuple[float, bool]], n_gold: int, threshold: float) -> Tuple[float, float, float]:
    kept = [is_gold for p, is_gold in candidates if p >= threshold]
    scores = PRF(n_pred=len(kept), n_gold=n_gold, pred_hits=sum(kept), gold_hits=sum(kept))
    return scores.p, scores.r, scores.f


def calibrate(
    nlp_or_component: Union[Language, MedLLMClassifierFilter],
    dev_examples: Iterable[Example],
    name: Optional[str] = None,
    progress: bool = False,
) -> Calibration:
    """The threshold of the filter that maximises strict F1 on ``dev_examples``, with the
    scores at that threshold and without the filter.

    With a pipeline, the dev texts run through it up to and including the filter; with a
    component, the examples' predicted docs must already hold the candidate group. The
    filter keeps everything while scoring (threshold 0); its threshold is left unchanged.
    When the generator predicts nothing on the dev texts the current threshold is returned
    with ``n_candidates`` 0.
    """
    examples = list(dev_examples)
    if isinstance(nlp_or_component, Language):
        nlp = nlp_or_component
        component = find_filter(nlp, name)
        names = nlp.pipe_names
        after = names[names.index(component.name) + 1 :]
        texts = [eg.reference.text for eg in examples]
    else:
        component = nlp_or_component
    key = component.spans_key
    saved, component.threshold = component.threshold, 0.0
    try:
        if isinstance(nlp_or_component, Language):
            with nlp.select_pipes(disable=after):
                docs = list(tqdm(nlp.pipe(texts), total=len(texts), unit="doc", desc="calibrate", disable=not progress))
        else:
            docs = list(component.pipe(eg.predicted.copy() for eg in examples))
    finally:
        component.threshold = saved
    candidates: List[Tuple[float, bool]] = []
    n_gold = 0
    for doc, eg in zip(docs, examples):
        gold = {(s.start_char, s.end_char, s.label_) for s in eg.reference.spans.get(key, [])}
        n_gold += len(gold)
        group = doc.spans.get(key, [])
        scores = group.attrs.get("scores", []) if len(group) else []
        best_p = {}
        for span, p in zip(group, scores):
            k = (span.start_char, span.end_char, span.label_)
            best_p[k] = max(p, best_p.get(k, 0.0))
        candidates.extend((p, k in gold) for k, p in best_p.items())
    if not candidates:  # nothing to choose from: keep the threshold, report zeros
        return Calibration(saved, (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), 0, 0, n_gold)
    threshold, _ = best_threshold(candidates, n_gold)
    return Calibration(
        threshold=threshold,
        filtered=_prf(candidates, n_gold, threshold),
        unfiltered=_prf(candidates, n_gold, 0.0),
        n_candidates=len(candidates),
        n_kept=sum(p >= threshold for p, _ in candidates),
        n_gold=n_gold,
    )
