"""Copy-constrained decoding with speculative verification and shared-prefix KV reuse.

For the symbol strategy the answer is fully known except for where the brackets go: a
forced prefix (the type line) followed by the source sentence with ``[`` ``]`` inserted.
Three things follow from that and are implemented here:

- **Constraint.** A small nondeterministic automaton over the UTF-8 *bytes* of the legal
  answers (so byte-level BPE tokens that split a character or glue ``[`` to text are
  handled), walked together with a sorted index of the vocabulary's byte strings: the
  allowed tokens at a step are found by following only the bytes the automaton accepts,
  never by scanning the vocabulary. The model cannot hallucinate text, loop on brackets or
  stop early, and every entity aligns.
- **Speculative verification.** The rest of the answer without further brackets is the
  draft. It is fed in one forward pass; tokens are accepted while the constrained argmax
  equals the draft token, the model's choice is taken at the first disagreement. Each token
  is still the constrained argmax given exactly the tokens before it, so the output is
  token-for-token the constrained greedy output; only the number of forward passes falls.
- **Shared prefix.** The per-type prompts of a sentence differ only at the end (the type
  is last in the template): the common token prefix is run once and its KV cache is copied
  to every row.

Rows progress at different speeds, so the batch keeps one KV cache with explicit position
ids per row and a mask over its columns: rejected draft positions are masked, cropped when
no row needs them and compacted away when the holes grow. With drafts the batch is
continuous: a finished row leaves and the next text's rows take its cache row in the next
pass, their prefix written in place (a trained model brackets one or two types of a
sentence and copies the others in a pass or two, so a fixed batch would run its slowest
row's tail alone). Prompt tokens ride in those passes in chunks no wider than a draft.
The draft length adapts per row to how far the model followed the last draft, and is
short where a bracket is likely (inside an open bracket; a row's first draft by its
type's bracket rate so far): the output does not depend on it, only the compute does.
The choices of
all verified positions of a pass are made in a few tensor operations on the device
(:meth:`.options._Staged.choose`); the output layer runs on those positions only
(:func:`.batch._plain_head`). A pass packs the rows' blocks into one sequence of real
tokens (no padding in the projections and feed-forward blocks; :mod:`.attention` lays
them out per row for attention only), sends its inputs to the device in one transfer
and reads back one tensor of choices; the cache of all layers is one tensor
(:mod:`.kvstore`), so moving rows and columns is one operation whatever the depth.

``generate_constrained`` is the runtime entry (``HFGenerator`` calls it for requests that
carry a constraint); :func:`~spacy_medllm.llm.prompt_lookup.generate_prompt_lookup` offers
Hugging Face prompt-lookup decoding to the strategies without a strict copy constraint.
``benchmarks/decoding.py`` measures all of it against plain ``generate``.

One job per module:

- :mod:`.automaton`: the constraint as a byte-level automaton (:class:`CopyAutomaton`);
- :mod:`.vocab`: the vocabulary as sorted byte strings (:class:`VocabIndex`);
- :mod:`.options`: the legal tokens per configuration and the constrained choice;
- :mod:`.batch`: the KV cache of rows at different positions and the model pass over it;
- :mod:`.drafts`: draft tokens from the source's own tokenization;
- :mod:`.stream`: the continuous-batching decode loop, :func:`decode_constrained` and
  :func:`generate_constrained`;
- :mod:`.results`: what a decoding call returns (:class:`DecodedRow`, :class:`DecodeStats`);
- :mod:`.rule`: the same choice one position at a time for a model server's sampler
  (:class:`CopyRule`); it imports neither spaCy nor peft;
- :mod:`.kvstore`: the KV cache of all layers as one tensor (:class:`~.kvstore.KVStore`);
- :mod:`.attention`: the attention of a packed pass, grouped heads without copies;
- :mod:`.transfer`: every host<->device transfer, counted (one each way per pass);
- :mod:`.instrumentation`: counting model calls and transfers (:func:`count_forward_passes`,
  :func:`count_transfers`).
"""
from ...types import CopyConstraint
from .automaton import DONE, Configs, CopyAutomaton, DraftSpan
from .batch import forward_module, shared_prefix_groups
from .instrumentation import count_forward_passes, count_transfers
from .results import DecodedRow, DecodeStats
from .rule import (
    COPY_REQUEST_ARG,
    CopyCursor,
    CopyRule,
    copy_request_arg,
    read_copy_request_arg,
)
from .stream import StreamSettings, decode_constrained, generate_constrained
from .vocab import VocabIndex, token_bytes, vocab_index

__all__ = [
    "COPY_REQUEST_ARG",
    "DONE",
    "Configs",
    "CopyAutomaton",
    "CopyConstraint",
    "CopyCursor",
    "CopyRule",
    "DecodeStats",
    "DecodedRow",
    "DraftSpan",
    "StreamSettings",
    "VocabIndex",
    "copy_request_arg",
    "count_forward_passes",
    "count_transfers",
    "decode_constrained",
    "forward_module",
    "generate_constrained",
    "read_copy_request_arg",
    "shared_prefix_groups",
    "token_bytes",
    "vocab_index",
]
