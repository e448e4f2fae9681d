"""The copy rule inside a vLLM server, so a served model answers token for token what
``medllm_ner`` answers in-process.

A grammar (what :mod:`.copy_grammar` sends) makes the server pick the most probable
*allowed* token, which is the in-process decoder with ``text_mass`` off; with a model that
copies imperfectly that rule brackets nearly every word. ``text_mass`` weighs a bracket
against all text tokens together, legal or not, so it needs the model's raw distribution,
which only a logits processor sees. This one runs :class:`~.copy.rule.CopyRule` on the
requests that carry a constraint in ``vllm_xargs`` (the ``OpenAIServer`` generator writes
it) and leaves every other request alone. Start the server with::

    --logits-processors spacy_medllm.llm.vllm_copy:CopyLogitsProcessor

vLLM refuses custom logits processors together with speculative decoding; use the grammar
(``copy_rule = "grammar"``) for n-gram drafts. Log-probabilities come from the raw logits
(vLLM's default ``logprobs_mode``), so with a non-zero ``open_bias`` they are the unbiased
ones, where in-process they are the biased ones.
"""
import logging
from typing import Dict, List, Optional, Tuple

import torch
from transformers import AutoTokenizer
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from .copy.rule import COPY_REQUEST_ARG, CopyCursor, CopyRule, read_copy_request_arg

logger = logging.getLogger("spacy_medllm.vllm")


class CopyLogitsProcessor(LogitsProcessor):
    """Leaves only the in-process decoder's choice open in each constrained row."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        arg = (sampling_params.extra_args or {}).get(COPY_REQUEST_ARG)
        if arg is not None:
            read_copy_request_arg(arg)  # a malformed constraint is the client's error (HTTP 400)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        model_config = vllm_config.model_config
        self.tokenizer = AutoTokenizer.from_pretrained(
            model_config.tokenizer, trust_remote_code=model_config.trust_remote_code
        )
        self.rules: Dict[Tuple[int, ...], CopyRule] = {}
        # batch index -> (rule, cursor, the request's live list of output tokens)
        self.rows: Dict[int, Tuple[CopyRule, CopyCursor, List[int]]] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: Optional[BatchUpdate]) -> None:
        process_dict_updates(self.rows, batch_update, self._new_row)

    def _new_row(self, params: SamplingParams, _prompt: Optional[List[int]], output: List[int]):
        arg = (params.extra_args or {}).get(COPY_REQUEST_ARG)
        if arg is None:
            return None
        constraint, eos = read_copy_request_arg(arg)
        rule = self.rules.get(eos)
        if rule is None:
            rule = self.rules[eos] = CopyRule(self.tokenizer, eos)
        return rule, rule.start(constraint), output

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        by_rule: Dict[int, Tuple[CopyRule, List[int], List[CopyCursor]]] = {}
        for index, (rule, cursor, output) in list(self.rows.items()):
            if not self._catch_up(rule, cursor, output):
                del self.rows[index]
                continue
            _, indices, cursors = by_rule.setdefault(id(rule), (rule, [], []))
            indices.append(index)
            cursors.append(cursor)
        for rule, indices, cursors in by_rule.values():
            rows = torch.tensor(indices, dtype=torch.long, device=logits.device)
            chosen = torch.tensor(rule.choose(logits[rows], cursors), dtype=torch.long, device=logits.device)
            logits[rows] = float("-inf")
            logits[rows, chosen] = 0.0
        return logits

    @staticmethod
    def _catch_up(rule: CopyRule, cursor: CopyCursor, output: List[int]) -> bool:
        """Advance the cursor over the tokens sampled since the last pass; False when one
        broke the constraint (the row is then left unconstrained, and the client, which
        checks every answer, reports it)."""
        while cursor.taken < len(output) and output[cursor.taken] >= 0:  # < 0: a placeholder
            token = output[cursor.taken]
            if not rule.take(cursor, token):
                logger.warning("token %d breaks the copy constraint of %r; row left unconstrained", token, cursor.automaton.constraint.source)
                return False
        return True
