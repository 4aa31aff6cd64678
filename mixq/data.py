"""The one data locator: every dataset and model file in mixq is found through `find_data`.

Search order for a relative path such as ``"mnist"`` or ``"wikitext-2-raw/wiki.test.raw"``:

1. ``$MIXQ_DATA/<path>`` (environment variable),
2. ``<repo>/data/<path>`` (the project's git-ignored data folder; also ``./data`` of the cwd),
3. ``<repo>/../shared/data/<path>`` (staged data beside the checkout).

If none exists, `find_data` raises `FileNotFoundError` listing where it looked. Downloads are
the caller's business (e.g. MNIST through torchvision) and happen only when `network_available()`
says a hub can be reached; tests never download.
"""
from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def project_dir(name: str) -> Path:
    """``<repo>/<name>`` in a source checkout (also an editable install), whatever the cwd
    (repo root or notebooks/); ``./<name>`` for a plain pip install. E.g.
    ``project_dir("figures")``, ``project_dir("results")``."""
    return (REPO_ROOT if (REPO_ROOT / "pyproject.toml").is_file() else Path.cwd()) / name


def data_roots() -> list[Path]:
    """Candidate data roots, in search order (existing or not)."""
    roots: list[Path] = []
    if os.environ.get("MIXQ_DATA"):
        roots.append(Path(os.environ["MIXQ_DATA"]).expanduser())
    roots += [REPO_ROOT / "data", Path.cwd() / "data",
              REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    unique: list[Path] = []
    for r in roots:
        if r.resolve() not in [u.resolve() for u in unique]:
            unique.append(r)
    return unique


def find_data(relpath: str | os.PathLike, *, required: bool = True) -> Path | None:
    """Return the first existing ``<root>/<relpath>`` over `data_roots()`.

    Raises FileNotFoundError (if `required`) naming every place searched; else returns None.
    """
    for root in data_roots():
        p = root / relpath
        if p.exists():
            return p
    if required:
        tried = "\n  ".join(str(r / relpath) for r in data_roots())
        raise FileNotFoundError(f"data file {str(relpath)!r} not found; looked in:\n  {tried}\n"
                                "Set MIXQ_DATA or copy the data into data/ (see data/README.md).")
    return None


def default_download_dir() -> Path:
    """Where downloads go when nothing is found: ``$MIXQ_DATA`` if set, else ``<repo>/data``."""
    if os.environ.get("MIXQ_DATA"):
        return Path(os.environ["MIXQ_DATA"]).expanduser()
    return REPO_ROOT / "data"


def network_available(host: str = "huggingface.co", port: int = 443, timeout: float = 2.0) -> bool:
    """True if a TCP connection to `host:port` opens within `timeout` seconds.

    ``MIXQ_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` forces False (CI and tests set it).
    """
    if os.environ.get("MIXQ_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file (integrity of downloads and saved checkpoints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def smoke_mode() -> bool:
    """True when ``MIXQ_SMOKE=1``: notebooks and CLIs shrink data and models to run on a CPU."""
    return os.environ.get("MIXQ_SMOKE", "0") not in ("", "0", "false", "False")
