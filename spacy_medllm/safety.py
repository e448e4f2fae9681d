"""What a saved pipeline may do on the machine that loads it.

A pipeline directory is shared like a model, so nothing in it may run code: prompt
templates render in Jinja's sandbox, options that run code or unpickle weights
(``trust_remote_code``, ``use_safetensors = false``) are honoured only when the user of the
loading process allows them through an environment variable (a config file, being part
of the artifact, cannot), and files are never read or copied through a symbolic link that
leaves the directory they belong to.
"""
import os
import shutil
from pathlib import Path
from typing import Union

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import UnsafeArtifactError

TRUST_REMOTE_CODE_ENV = "SPACY_MEDLLM_TRUST_REMOTE_CODE"
ALLOW_PICKLE_ENV = "SPACY_MEDLLM_ALLOW_PICKLE"
_ALL = {"1", "true", "yes", "all"}



def template_environment(loader: jinja2.BaseLoader) -> ImmutableSandboxedEnvironment:
    """The Jinja environment every prompt template is rendered in: sandboxed (no access to
    Python internals such as ``__globals__``, no mutation of the values passed in)."""
    return ImmutableSandboxedEnvironment(
        loader=loader, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        keep_trailing_newline=False, autoescape=False,
    )


def allowed_by_user(variable: str, path: Union[str, Path]) -> bool:
    """Whether the environment variable ``variable`` allows its option for ``path``: ``1``
    (or ``true``/``yes``/``all``) allows it everywhere, otherwise it is a list of
    directories (separated by ``os.pathsep``) that ``path`` must be inside of."""
    value = os.environ.get(variable, "").strip()
    if not value:
        return False
    if value.lower() in _ALL:
        return True
    target = Path(path).expanduser().resolve()
    for entry in filter(None, value.split(os.pathsep)):
        trusted = Path(entry).expanduser().resolve()
        if target == trusted or trusted in target.parents:
            return True
    return False


def require_user_permission(variable: str, path: Union[str, Path], what: str) -> None:
    """Raise unless the loading user allowed ``what`` for ``path`` through ``variable``."""
    if not allowed_by_user(variable, path):
        raise UnsafeArtifactError(
            f"The configuration asks to {what} for {path}. A config or a saved pipeline cannot "
            f"grant this to itself, because it runs code from the model folder on this machine. "
            f"If you trust {path}, allow it in the environment of the process that loads it: "
            f"{variable}={path} (several folders separated by {os.pathsep!r}, or 1 for all)."
        )


def check_links(root: Union[str, Path]) -> None:
    """Raise if a symbolic link under ``root`` (``root`` itself included) leads outside it."""
    root = Path(root)
    if root.is_symlink():
        raise UnsafeArtifactError(f"{root} is a symbolic link; a saved pipeline folder must be a real folder.")
    resolved_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                target = path.resolve()
                if target != resolved_root and resolved_root not in target.parents:
                    raise UnsafeArtifactError(
                        f"{path} is a symbolic link to {target}, outside {root}. A saved pipeline "
                        "may not refer to files elsewhere on this machine; replace the link by the file."
                    )


def copy_tree(src: Union[str, Path], dst: Union[str, Path]) -> None:
    """Copy the folder ``src`` to ``dst`` (replaced), refusing links that leave ``src``;
    links inside it are copied as links, so nothing outside ``src`` is ever read."""
    src, dst = Path(src), Path(dst)
    check_links(src)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, symlinks=True)


def copy_file(src: Union[str, Path], dst: Union[str, Path]) -> None:
    """Copy one file, refusing a symbolic link (a received pipeline's file is a link only
    to pull something else into what the user saves next)."""
    src = Path(src)
    if src.is_symlink():
        raise UnsafeArtifactError(f"{src} is a symbolic link; copy the file it points to in its place.")
    shutil.copyfile(src, dst)


__all__ = [
    "TRUST_REMOTE_CODE_ENV",
    "ALLOW_PICKLE_ENV",
    "template_environment",
    "allowed_by_user",
    "require_user_permission",
    "check_links",
    "copy_tree",
    "copy_file",
]
