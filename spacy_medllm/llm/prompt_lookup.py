"""Hugging Face prompt-lookup decoding behind the generation interface, for strategies
whose answers quote the text without a strict copy constraint.

Not part of the copy decoder (:mod:`.copy`): it has no constraint, only drafts copied from
the prompt, and transformers runs it; it answers ``GenerationRequest``s with
``GenerationResult``s like :class:`~.generation.HFGenerator`.
"""
import time
from typing import List, Optional, Sequence

from .copy.instrumentation import count_forward_passes
from .generation import GenerationRequest, GenerationResult, HFGenerator
from .loader import LoadedLM


def generate_prompt_lookup(
    lm: LoadedLM, requests: Sequence[GenerationRequest], adapter: Optional[str] = None, num_tokens: int = 10
) -> List[GenerationResult]:
    """Greedy decoding with Hugging Face prompt-lookup decoding (drafts copied from
    n-grams of the prompt), for strategies whose answers quote the text without a strict
    copy constraint (JSON, HTML, mark, entity lists). The output equals plain greedy;
    transformers runs it one request at a time. Returns ``GenerationResult``s."""
    import torch

    generator = HFGenerator(lm, adapter)
    tokenizer = generator.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else generator.stop_ids[0]
    results: List[GenerationResult] = []
    with lm.use(adapter) as model, torch.inference_mode(), count_forward_passes(model) as passes:
        for req in requests:
            start, before = time.perf_counter(), passes[0]
            prompt = generator.encode(req)
            ids = torch.tensor([prompt], device=model.device)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                prompt_lookup_num_tokens=num_tokens,
                do_sample=False,
                max_new_tokens=req.max_new_tokens,
                eos_token_id=generator.stop_ids,
                pad_token_id=pad_id,
                output_logits=True,
                return_dict_in_generate=True,
            )
            new = out.sequences[0, len(prompt) :].tolist()
            logprobs = [
                float(torch.log_softmax(step[0].double(), dim=-1)[tok]) for step, tok in zip(out.logits, new)
            ]
            stopped = bool(new) and new[-1] in generator.stop_ids
            results.append(
                GenerationResult(
                    text=tokenizer.decode(new[:-1] if stopped else new, skip_special_tokens=True),
                    token_ids=new,
                    logprobs=logprobs,
                    finish_reason="stop" if stopped else "length",
                    forward_passes=passes[0] - before,
                    generated_tokens=len(new),
                    prompt_tokens=len(prompt),
                    seconds=time.perf_counter() - start,
                )
            )
    return results
