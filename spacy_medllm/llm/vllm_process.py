"""A vLLM OpenAI-compatible server as a child process on loopback: started from vLLM's own
Python (it pins its own torch and transformers, so it lives in its own environment, see
``scripts/vllm_env.sh``), ready once ``/v1/models`` answers, stopped with its process group.
The served-model tests and ``benchmarks/serving.py`` use it; so can a user who wants the
served path on one machine."""
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

from ..embedded import EMBEDDED_DIR

PACKAGE_ROOT = Path(__file__).resolve().parents[2]


class VLLMProcess:
    """``model`` served as ``name`` at ``url`` (``http://127.0.0.1:PORT/v1``); ``args`` are
    more server flags (``--logits-processors ...``, ``--enable-lora ...``). The copy
    processor is importable in the server because this package's root is put on its
    PYTHONPATH (what ``pip install --no-deps spacy-medllm`` does in a server's environment)."""

    def __init__(
        self,
        python: Path,
        log: Path,
        args: Sequence[str] = (),
        model: Path = EMBEDDED_DIR,
        name: str = "tiny",
        ready_seconds: float = 900.0,
        threads: Optional[int] = None,
    ) -> None:
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}/v1"
        self.log = log
        command = [
            str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
            "--port", str(port), "--dtype", "float32", "--max-model-len", "2048", "--served-model-name", name, *args,
        ]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(PACKAGE_ROOT)}
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        with open(log, "w") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait(ready_seconds)
        except BaseException:
            self.stop()
            raise

    def _wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/models", timeout=5):
                    return
            except OSError:
                time.sleep(2)
        raise RuntimeError(f"vLLM was not ready after {seconds:.0f} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, 15)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
            self.process.wait()

    def __enter__(self) -> "VLLMProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
