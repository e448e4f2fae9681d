"""Representative training entities per type, shown to the decision LLM of the ensemble.

A type's definition says what the type is; a few typical entities show where its
boundaries lie in the corpus. Typical, not frequent: the unique entity texts of a type are
embedded (mean hidden states of the base LLM, or character n-gram TF-IDF without a model),
clustered with K-Means (weighted by frequency, so a common form pulls its centroid), and
the text nearest each centroid is taken, largest cluster first. Same data and seed, same
exemplars.
"""
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Tuple, Union

import numpy
import srsly
from spacy.tokens import Doc
from spacy.util import registry

# texts -> one row per text
Embedder = Callable[[List[str]], numpy.ndarray]


def collect_entities(docs: Iterable[Doc], spans_key: str) -> Tuple[Dict[str, Counter], Counter]:
    """Entity texts per label from ``doc.spans[spans_key]`` (or ``doc.ents`` when a doc has
    no such group), with counts of what was skipped and why."""
    pool: Dict[str, Counter] = {}
    skipped: Counter = Counter()
    for doc in docs:
        if spans_key in doc.spans:
            spans = list(doc.spans[spans_key])
        elif doc.has_annotation("ENT_IOB"):
            spans = list(doc.ents)
        else:
            skipped["doc_without_annotation"] += 1
            continue
        for span in spans:
            text = span.text.strip()
            if not text:
                skipped["blank_entity"] += 1
                continue
            pool.setdefault(span.label_, Counter())[text] += 1
    return pool, skipped


def tfidf_embedder(ngram_range: Tuple[int, int] = (1, 3)) -> Embedder:
    """Character n-gram TF-IDF fitted on the texts being clustered (one type at a time)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    def embed(texts: List[str]) -> numpy.ndarray:
        vectorizer = TfidfVectorizer(analyzer="char", ngram_range=ngram_range)
        return vectorizer.fit_transform(texts).toarray()

    return embed


def lm_embedder(model, tokenizer, batch_size: int = 16) -> Embedder:
    """Mean of the last hidden layer of a (causal) LM over the tokens of each text alone."""
    import torch

    def embed(texts: List[str]) -> numpy.ndarray:
        rows = []
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            with torch.no_grad():
                hidden = model(**enc, output_hidden_states=True).hidden_states[-1].float()
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            rows.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu().numpy())
        return numpy.concatenate(rows)

    return embed


def select_exemplars(
    pool: Mapping[str, Counter], embed: Embedder, per_type: int = 5, seed: int = 0
) -> Dict[str, List[str]]:
    """``per_type`` distinct exemplars per label (all texts, most frequent first, when a
    label has no more than that)."""
    from sklearn.cluster import KMeans

    if per_type < 1:
        raise ValueError(f"per_type must be at least 1, got {per_type}")
    chosen: Dict[str, List[str]] = {}
    for label in sorted(pool):
        counts = pool[label]
        texts = sorted(counts, key=lambda t: (-counts[t], t))
        if len(texts) <= per_type:
            chosen[label] = texts
            continue
        vectors = embed(texts)
        weights = numpy.array([counts[t] for t in texts], dtype=float)
        kmeans = KMeans(n_clusters=per_type, random_state=seed, n_init=10).fit(vectors, sample_weight=weights)
        distances = kmeans.transform(vectors)
        mass = numpy.bincount(kmeans.labels_, weights=weights, minlength=per_type)
        picked: List[int] = []
        for cluster in sorted(range(per_type), key=lambda c: (-mass[c], c)):
            nearest = numpy.argsort(distances[:, cluster], kind="stable")
            picked.append(next(int(i) for i in nearest if int(i) not in picked))
        chosen[label] = [texts[i] for i in picked]
    return chosen


def save_exemplars(path: Union[str, Path], exemplars: Mapping[str, List[str]], **meta) -> None:
    srsly.write_json(path, {"exemplars": dict(exemplars), **meta})


def read_exemplars(path: Union[str, Path]) -> Dict[str, List[str]]:
    """Exemplars from a file written by ``save_exemplars`` (or a bare label -> texts map)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"Exemplars file not found: {path}")
    data = srsly.read_json(path)
    exemplars = data.get("exemplars", data) if isinstance(data, dict) else None
    if not isinstance(exemplars, dict) or not all(
        isinstance(v, list) and all(isinstance(t, str) for t in v) for v in exemplars.values()
    ):
        raise ValueError(f"{path}: expected {{'exemplars': {{label: [text, ...]}}}}")
    return {str(label): list(texts) for label, texts in exemplars.items()}


@registry.misc("spacy_medllm.Exemplars.v1")
def make_exemplars(path: str) -> Dict[str, List[str]]:
    """Read exemplars (``python -m spacy medllm exemplars``) for ``[initialize]``."""
    return read_exemplars(path)
