"""Every registered name and factory is reachable through an entry point, so a saved or
packaged pipeline loads with ``spacy.load`` without importing spacy_medllm first."""
import importlib
import pkgutil
from importlib.metadata import entry_points

import catalogue
import spacy_medllm

GROUPS = {
    "spacy_misc": ("spacy", "misc"),
    "spacy_readers": ("spacy", "readers"),
    "spacy_scorers": ("spacy", "scorers"),
    "spacy_tokenizers": ("spacy", "tokenizers"),
    "thinc_llm_models": ("thinc", "llm_models"),
    "thinc_llm_tasks": ("thinc", "llm_tasks"),
}


# modules that run where these are installed (the vLLM server's process), and register nothing
SERVER_SIDE = {"vllm"}


def _import_all_modules():
    for info in pkgutil.walk_packages(spacy_medllm.__path__, prefix="spacy_medllm."):
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as err:
            if err.name not in SERVER_SIDE:
                raise


def _declared(group):
    return {ep.name: ep.value for ep in entry_points(group=group)}


def test_every_registered_function_has_an_entry_point():
    _import_all_modules()
    registries = catalogue.REGISTRY
    for group, namespace in GROUPS.items():
        registered = {key[-1] for key in registries if key[:-1] == namespace and key[-1].startswith("spacy_medllm.")}
        declared = {name for name in _declared(group) if name.startswith("spacy_medllm.")}
        assert registered - declared == set(), f"{group}: registered but not declared"
        assert declared - registered == set(), f"{group}: declared but not registered"


def test_every_factory_has_an_entry_point_that_resolves():
    _import_all_modules()
    from spacy.language import Language

    ours = {name for name in Language.factories if name.startswith("medllm_")}
    declared = _declared("spacy_factories")
    assert ours == {name for name in declared if name.startswith("medllm_")}
    for ep in entry_points(group="spacy_factories"):
        if ep.name.startswith("medllm_"):
            assert callable(ep.load())


def test_cli_entry_point_mounts_the_command_group():
    (cli,) = [ep for ep in entry_points(group="spacy_cli") if ep.value.startswith("spacy_medllm")]
    app = cli.load()
    names = {c.name for c in app.registered_commands}
    assert {"convert", "errors", "build-instructions", "init-tiny", "train-llm", "exemplars"} <= names


def test_every_pipeline_config_goes_through_fill_config(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    for config in sorted((Path(__file__).resolve().parents[1] / "configs").glob("pipeline_*.cfg")):
        run = subprocess.run([sys.executable, "-m", "spacy", "init", "fill-config", str(config), str(tmp_path / config.name)],
                             capture_output=True, text=True)
        assert run.returncode == 0, (config.name, run.stdout[-1000:], run.stderr[-1000:])


def test_command_summaries_are_whole():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "spacy", "medllm", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "train-llm" in run.stdout
    assert "..." not in run.stdout.split("Commands:")[1], run.stdout


def test_no_kernel_download_notice_when_transformers_loads_bitsandbytes():
    import subprocess
    import sys

    code = "import spacy_medllm; from transformers import get_cosine_schedule_with_warmup; import bitsandbytes"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-1000:]
    assert "kernels-community" not in run.stderr
