"""benchmarks/decoding.py runs on its own (the shipped model, one sentence) and ends with
the machine-readable line the README documents; constrained, speculative and
shared-prefix decoding agree."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_decoding_benchmark_last_line():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "decoding.py"), "--sentences", "1"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"passes_ratio=([\d.]+) wall_ratio=([\d.]+) identical=(true|false) aligned=([\d.]+|n/a)", last)
    assert match, last
    assert match.group(3) == "true" and match.group(4) == "1.000"
    assert float(match.group(1)) > 1.0
    assert "checkpoint embedded" in result.stdout
