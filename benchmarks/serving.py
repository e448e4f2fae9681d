"""Serving benchmark: the embedded pipeline's generation in-process vs through vLLM.

    python benchmarks/serving.py [--sentences N] [--vllm-python PATH] [--concurrency C]

For N CMeEE dev sentences (assets/cmeee_dev.json, 200 by default) it builds the pipeline's
prompts (one per type) once and answers them seven ways, in one run:

- in-process, ``text_mass`` on (what ``medllm_ner`` does) and off, and off without the span
  limit (the grammar's reference);
- vLLM without any constraint (the engine's own speed on these prompts; answers not compared);
- vLLM with the copy logits processor (``copy_rule = "processor"``), ``text_mass`` on;
- vLLM with the copy grammar (``copy_rule = "grammar"``), which is ``text_mass`` off (and no
  span limit: ``served_constraint``);
- vLLM with the grammar and n-gram (prompt lookup) speculative drafts, vLLM's form of
  the in-process decoder's source-as-draft verification (vLLM allows no custom logits
  processor beside speculative decoding, so drafts go with the grammar).

Each served mode is compared token for token with its in-process reference (for the grammar:
``text_mass`` off and no span limit, as the grammar has none; in brackets, against the
in-process answers with the span limit), and sentences per second are reported with the
ratio to in-process ``text_mass`` on. Two servers are
started (one with the processor, one with n-gram drafts) from a vLLM environment
(``scripts/vllm_env.sh``); startup is not timed. On a CPU the in-process decoder's drafts
and shared prefix compete with vLLM's engine; the figures a GPU user cares about need a GPU.
"""
import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import spacy  # noqa: E402

from spacy_medllm.embedded import EMBEDDED_DIR  # noqa: E402
from spacy_medllm.llm.server import PROCESSOR, ServerGenerator, ServerSpec, served_constraint  # noqa: E402
from spacy_medllm.llm.vllm_process import VLLMProcess  # noqa: E402

NGRAM = {"method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_min": 2, "prompt_lookup_max": 4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--vllm-python", type=Path, default=ROOT / ".venv-vllm" / "bin" / "python")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight to the server")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per in-process model call")
    args = parser.parse_args()
    if not args.vllm_python.exists():
        sys.exit(f"no vLLM at {args.vllm_python}: run scripts/vllm_env.sh first")

    texts = [r["text"] for r in json.loads((ROOT / "assets" / "cmeee_dev.json").read_text("utf8"))[: args.sentences]]
    nlp = spacy.blank("zh")
    local = nlp.add_pipe("medllm_ner").generator
    requests = [job.request for job in nlp.get_pipe("medllm_ner").recognizer.plan(texts, lambda p: p.chat_text(local.tokenizer))]
    without_mass = [dataclasses.replace(r, constraint=dataclasses.replace(r.constraint, text_mass=False)) for r in requests]
    print(f"{len(texts)} sentences, {len(requests)} prompts, checkpoint embedded", flush=True)

    # the grammar leaves out the span limit (served_constraint): its reference does too
    unlimited = [dataclasses.replace(r, constraint=served_constraint(r.constraint)) for r in without_mass]
    rows = []

    def run(name, generate, reqs, *references):
        generate(reqs[:9])  # warm-up (first calls compile or load)
        start = time.perf_counter()
        results = generate(reqs)
        seconds = time.perf_counter() - start
        same = [f"{sum(a.token_ids == b.token_ids for a, b in zip(results, ref))}/{len(reqs)}" for ref in references]
        rows.append((name, len(texts) / seconds, " (".join(same) + ")" * (len(same) - 1) if same else "—"))
        print(f"  {name}: {seconds:.1f} s", flush=True)
        return results

    in_process = lambda reqs: local.generate(reqs, batch_size=args.batch_size)  # noqa: E731
    ref_mass = run("in-process, text_mass on", in_process, requests)
    ref_plain = run("in-process, text_mass off", in_process, without_mass)
    ref_unlimited = run("in-process, text_mass off, no span limit", in_process, unlimited)

    def served(url, rule):
        spec = ServerSpec(base_url=url, model="tiny", copy_rule=rule, tokenizer=str(EMBEDDED_DIR), max_concurrency=args.concurrency)
        return ServerGenerator(spec).generate

    with tempfile.TemporaryDirectory() as tmp:
        with VLLMProcess(args.vllm_python, Path(tmp) / "processor.log", ["--logits-processors", PROCESSOR]) as server:
            unconstrained = [dataclasses.replace(r, constraint=None) for r in requests]
            run("vLLM, unconstrained greedy (the engine alone)", served(server.url, "none"), unconstrained)
            run("vLLM + copy processor (text_mass on)", served(server.url, "processor"), requests, ref_mass)
            run("vLLM + copy grammar (text_mass off)", served(server.url, "grammar"), without_mass, ref_unlimited, ref_plain)
        with VLLMProcess(args.vllm_python, Path(tmp) / "ngram.log", ["--speculative-config", json.dumps(NGRAM)]) as server:
            run("vLLM + copy grammar + n-gram drafts", served(server.url, "grammar"), without_mass, ref_unlimited, ref_plain)

    base = rows[0][1]
    print("\n| mode | sentences/s | ratio to in-process | answers identical to in-process (to in-process with the span limit) |\n|---|---|---|---|")
    for name, rate, same in rows:
        print(f"| {name} | {rate:.2f} | {rate / base:.2f} | {same} |")


if __name__ == "__main__":
    main()
