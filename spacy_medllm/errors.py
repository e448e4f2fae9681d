"""Every error the package raises on purpose, in one place, so a caller can catch by kind
without importing the layer that raised it. Each message says what the user should change."""


class MedLLMLoadError(RuntimeError):
    """A model or adapter cannot be loaded as configured; the message says what to change."""


class MedLLMServerError(RuntimeError):
    """The server cannot be used as configured; the message names its URL and what to fix."""


class UnsafeArtifactError(ValueError):
    """A saved pipeline or model asks for something the loading user has not allowed."""


class SFTError(ValueError):
    """The training data or settings cannot be used as given; the message says what to change."""


class CorpusError(ValueError):
    """A run that cannot start as asked (no inputs, another run's folder, a missing extra):
    the user can fix it, so the CLI shows the message alone."""


def first_line(err: BaseException) -> str:
    """The informative line of a (possibly long, multi-line) library error."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("size mismatch"):
            return line.rstrip(".")
    return (lines[0] if lines else type(err).__name__).rstrip(".")
