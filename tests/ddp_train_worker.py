"""Run by tests/test_sft.py under ``torch.distributed.run``: full fine-tuning of a tiny
model on the given records, rank 0 writing the per-step losses as JSON."""
import json
import sys
from pathlib import Path

from spacy_medllm.llm.loader import ModelSpec
from spacy_medllm.training.sft import SFTConfig, SFTModel, train_sft
from spacy_medllm.training.sft_data import read_chat_records


def main(base: str, records: str, out: str, settings: str) -> None:
    result = train_sft(
        SFTModel(base=ModelSpec(path=base, dtype="float32"), method="full"),
        read_chat_records(records), SFTConfig(**json.loads(settings)), Path(out) / "run",
    )
    if result.losses:
        (Path(out) / "losses.json").write_text(json.dumps(result.losses))


if __name__ == "__main__":
    main(*sys.argv[1:])
