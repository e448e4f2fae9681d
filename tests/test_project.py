"""The project workflow chains: ``spacy project run all`` on a copy of the project whose
shipped sample is cut to a few sentences, with a tiny model (hidden 32) trained for two
steps. Checks what each step leaves behind, that the packaged pipeline loads by name from
elsewhere, and that project.yml names every data set and workflow the README promises."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import srsly
from spacy.tokens import DocBin
from spacy.vocab import Vocab

ROOT = Path(__file__).resolve().parents[1]

# a tiny model, two steps, a handful of records: the point is that the commands chain
SMALL_VARS = {
    "max_steps": 2,
    "hidden": 32,
    "layers": 1,
    "heads": 2,
    "kv_heads": 1,
    "intermediate": 64,
    "eval_limit": 2,
    "cls_size": 40,
    "cls_dev_size": 10,
    "cls_epochs": 1,
    "mine_limit": 4,
    "threads": 1,
    "viz_limit": 2,
}
SLICE = {"cmeee_train": 12, "cmeee_dev": 2, "cmeee_test": 2}


def _env() -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    return env


def _run(args, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of project.yml, configs/, scripts/ and assets/ with the CMeEE sample sliced."""
    root = tmp_path_factory.mktemp("project")
    shutil.copy(ROOT / "project.yml", root / "project.yml")
    for folder in ("configs", "scripts", "assets"):
        shutil.copytree(ROOT / folder, root / folder)
    for stem, n in SLICE.items():
        records = json.loads((ROOT / "assets" / f"{stem}.json").read_text(encoding="utf8"))[:n]
        (root / "assets" / f"{stem}.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf8")
    return root


@pytest.fixture(scope="module")
def ran_all(project: Path) -> Path:
    overrides = [arg for key, value in SMALL_VARS.items() for arg in (f"--vars.{key}", str(value))]
    _run([sys.executable, "-m", "spacy", "project", "run", "all", str(project), *overrides], cwd=project)
    return project


def _docs(path: Path):
    return list(DocBin().from_disk(path).get_docs(Vocab()))


def test_project_yml_names_workflows_and_sources():
    config = srsly.read_yaml(ROOT / "project.yml")
    assert {"all", "demo", "all-gpu", "cmeee", "ccks2019", "rocling", "english"} <= set(config["workflows"])
    commands = {c["name"]: c for c in config["commands"]}
    for workflow in config["workflows"].values():
        assert all(step in commands for step in workflow)
    # the full data sets are named, never fetched: no asset has a url or a git source
    assert all("url" not in a and "git" not in a for a in config["assets"])
    described = " ".join(a["description"] for a in config["assets"])
    for source in ("CMeEE", "Yidu-S4K", "ROCLING", "NCBI"):
        assert source in described
    # every shipped sample file is listed as an asset
    shipped = {f"assets/{p.name}" for p in (ROOT / "assets").iterdir() if p.suffix != ".md"}
    assert shipped <= {a["dest"] for a in config["assets"]}
    assert "--normalize t2s" in " ".join(commands["rocling-data"]["script"])
    assert "t2s" in " ".join(commands["rocling-evaluate"]["script"])
    assert "${vars.data_dir}" in " ".join(commands["english-data"]["script"])
    assert config["vars"]["data_dir"] == "../shared/data"


def test_all_chains_and_leaves_metrics(ran_all: Path):
    corpus = ran_all / "corpus"
    assert [len(_docs(corpus / f"{stem}.spacy")) for stem in SLICE] == list(SLICE.values())
    assert list((corpus / "instructions").glob("cmeee_train.symbol.*.jsonl"))
    for name in ("dev", "test"):
        scores = srsly.read_json(ran_all / "metrics" / f"{name}.json")
        for key in ("ents_p", "ents_r", "ents_f", "spans_sc_p", "spans_sc_r", "spans_sc_f"):
            assert 0.0 <= scores[key] <= 1.0, (name, key)
    errors = srsly.read_json(ran_all / "metrics" / "errors_test.json")
    assert set(errors) == {"scores", "errors"}
    predicted = _docs(corpus / "predictions" / "cmeee_test.spacy")
    gold = _docs(corpus / "cmeee_test.spacy")
    assert [d.text for d in predicted] == [d.text for d in gold]
    assert all("sc" in d.spans for d in predicted)
    assert len(srsly.read_json(corpus / "exemplars.json")) > 0
    html = (ran_all / "visualize" / "test.html").read_text(encoding="utf8")
    assert html.count("2 predicted") == 1 and html.count("1 gold") == 1
    # the pipeline carries its models: nothing points back into training/
    cfg = (ran_all / "training" / "pipeline" / "ner" / "cfg").read_text(encoding="utf8")
    assert json.loads(cfg)["base_copied"] is True


def test_package_loads_by_name_elsewhere(ran_all: Path, tmp_path: Path):
    package_dir = ran_all / "packages" / "zh_medllm_tiny-0.1.0"
    assert (package_dir / "setup.py").exists()
    target = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
          "--target", str(target), str(package_dir)], cwd=tmp_path)
    # a fresh interpreter in another folder, importing spacy only: the factories come
    # through the spacy_factories entry points of the installed spacy-medllm
    script = (
        "import spacy, json, sys\n"
        "nlp = spacy.load('zh_medllm_tiny')\n"
        "print(json.dumps({'pipe_names': nlp.pipe_names, 'lang': nlp.lang}))\n"
        "doc = nlp('患儿发热三天，咳嗽。')\n"
        "print(json.dumps({'tokens': len(doc), 'has_sc': 'sc' in doc.spans}))\n"
    )
    env = _env()
    env["PYTHONPATH"] = str(target)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert lines[0] == {"pipe_names": ["ner", "align", "cls"], "lang": "zh"}
    assert lines[1] == {"tokens": 10, "has_sc": True}
