"""The slow check of the instruction-tuning issue (not run in CI): build the tiny model from
scratch, train it with ``train-llm`` and the shipped recipe (configs/train_llm_tiny.cfg)
for a few minutes, then decode held-out dev sentences through the generator runtime.

    MEDLLM_SLOW=1 python -m pytest -q tests/test_slow_tiny.py -s

``MEDLLM_SLOW_MINUTES`` (default 10) is the training budget, ``MEDLLM_SLOW_THREADS``
(default 2) the torch threads. It asserts that the model learned (loss fell), that the copy-constrained
answers reach a strict F1 clearly above zero on sentences it never saw, and that they are
well-formed symbol answers (the source with balanced brackets) that do mark something.

Measured (12 minutes, one thread shared with other jobs, 3,230 steps): strict P 5.9% R 2.7% F 3.75% on the 50
held-out texts. Free (unconstrained) generation by such a model is not well-formed: it has
not learned to copy unseen text (0 of 90 answers of the shipped model on 10 dev texts).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spacy_medllm.labels import get_scheme
from spacy_medllm.llm.generation import HFGenerator
from spacy_medllm.recognizer import Recognizer, RecognizerSettings
from spacy_medllm.strategies.symbol import SymbolStrategy
from spacy_medllm.training.evaluate import load_trained, make_generation_evaluator

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "configs" / "templates" / "symbol_tiny.zh.jinja"
DEV = ROOT / "assets" / "cmeee_dev.json"
HELD_OUT = 50
ANSWERS = 10

pytestmark = pytest.mark.skipif(not os.environ.get("MEDLLM_SLOW"), reason="slow check: set MEDLLM_SLOW=1")


def _run(*args):
    subprocess.run([sys.executable, "-m", "spacy", "medllm", *args], cwd=ROOT, check=True)


def _well_formed(answer: str, source: str, prefix: str) -> bool:
    """The answer prefix, then exactly the source with balanced ``[``/``]`` inserted."""
    if not answer.startswith(prefix):
        return False
    depth = 0
    for ch in answer[len(prefix):]:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0 and answer[len(prefix):].replace("[", "").replace("]", "") == source


def test_tiny_model_trained_for_minutes_finds_entities(tmp_path):
    minutes = float(os.environ.get("MEDLLM_SLOW_MINUTES", "10"))
    threads = os.environ.get("MEDLLM_SLOW_THREADS", "2")
    base, out = tmp_path / "base", tmp_path / "run"
    _run("init-tiny", str(base), "--corpus", "assets/cmeee_train.json", "--corpus", "assets/cmeee_dev.json",
         "--hidden", "192", "--layers", "3", "--heads", "4", "--kv-heads", "2", "--intermediate", "512")
    _run("train-llm", "configs/train_llm_tiny.cfg", "--output", str(out), "--paths.base_model", str(base),
         "--training.max_minutes", str(minutes), "--training.num_threads", threads,
         "--training.eval_every", "0", "--training.progress_bar", "false")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10

    strategy = SymbolStrategy(template=str(TEMPLATE))
    evaluator = make_generation_evaluator(str(DEV), strategy, recognizer=RecognizerSettings(max_depth=1, max_span_chars=40), limit=HELD_OUT)
    scores = evaluator(out / "model-last")
    print("constrained, held-out dev:", {k: scores[k] for k in ("p", "r", "f", "n_pred", "n_gold")})
    assert scores["f"] > 0.03

    # The answers themselves: the prefix, then the source with balanced brackets (the copy
    # constraint's promise; free generation by this tiny model does not copy unseen text).
    texts = [eg.text for eg in evaluator.examples][:ANSWERS]
    recognizer = Recognizer(strategy, get_scheme("cmeee"), RecognizerSettings(
        max_chars=None, max_new_tokens=2 * max(map(len, texts)) + 16, max_depth=1, max_span_chars=40))
    lm, adapter = load_trained(out / "model-last")
    jobs = recognizer.plan(texts, lambda prompt: prompt.messages())
    results = HFGenerator(lm, adapter).generate([job.request for job in jobs], batch_size=64)
    prefixes = [strategy.answer_prefix(job.prompt.scheme, job.prompt.label) for job in jobs]
    assert all(_well_formed(r.text, job.shard, p) for job, r, p in zip(jobs, results, prefixes))
    assert sum(r.text.count("[") for r in results) > 0
