"""benchmarks/gpu_check.py --dry-run: every step of the GPU check runs on the CPU with tiny
shapes, the steered modes (a)-(d) all decode the gold answers, drafts save model calls,
and the results reach the JSON and the table."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    results = json.loads((tmp_path / "gpu_check.json").read_text(encoding="utf8"))
    assert results["failed"] == []
    assert results["shapes"]["status"] == "ok" and results["shapes"]["7b"] > 6e9
    modes = results["decoding"]["tiny"]
    for key in "abcd":
        assert modes[key]["status"] == "ok", modes[key]
        assert modes[key]["equal_to_gold"] is True and modes[key]["same_as_a"] is True, (key, modes[key])
    for key in "cd":
        assert modes[key]["calls_per_sentence"] < modes["a"]["calls_per_sentence"]
    assert results["qlora"]["status"] == "ok" and results["qlora"]["seconds_per_step"] > 0
    assert results["vllm"]["status"] in ("ok", "skipped")
    assert "| (d) + shared prefix | tiny | ok |" in result.stdout
