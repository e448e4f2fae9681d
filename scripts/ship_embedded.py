"""Put a trained generator into the package as the embedded default model.

    python scripts/ship_embedded.py training/embedded/ner/model-best spacy_medllm/embedded_model \
        --stage copy=training/embedded/copy --stage ner=training/embedded/ner

Copies the model folder (weights, tokenizer, prompt template) in place of PACKAGE_DIR and,
for each training stage, its config (``train_<stage>.cfg``), its training record
(``training_meta_<stage>.json``) and its evaluations (``evaluations_<stage>.jsonl``), so
the shipped model carries the recipe that made it.
"""
import argparse
import json
import shutil
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("package_dir", type=Path)
    parser.add_argument("--stage", action="append", default=[], help="NAME=OUTPUT_DIR of a train-llm run")
    args = parser.parse_args()
    if not (args.model_dir / "config.json").exists():
        raise SystemExit(f"{args.model_dir} is not a trained model folder (no config.json)")
    if args.package_dir.exists():
        shutil.rmtree(args.package_dir)
    shutil.copytree(args.model_dir, args.package_dir)
    for stage in args.stage:
        name, _, folder = stage.partition("=")
        folder = Path(folder)
        shutil.copyfile(folder / "config.cfg", args.package_dir / f"train_{name}.cfg")
        shutil.copyfile(folder / "training_meta.json", args.package_dir / f"training_meta_{name}.json")
        lines = (folder / "log.jsonl").read_text(encoding="utf8").splitlines()
        evaluations = [line for line in lines if "eval" in json.loads(line)]
        (args.package_dir / f"evaluations_{name}.jsonl").write_text("\n".join(evaluations) + "\n", encoding="utf8")
    size = sum(f.stat().st_size for f in args.package_dir.glob("*.safetensors"))
    print(f"Shipped {args.model_dir} to {args.package_dir} ({size / 1e6:.1f} MB of weights)")


if __name__ == "__main__":
    main()
