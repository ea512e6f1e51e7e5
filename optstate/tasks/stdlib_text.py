"""A byte-level text corpus that every Python installation carries: stdlib source files.

The corpus is read from ``sysconfig.get_paths()["stdlib"]`` in a fixed order, from two fixed
lists of well-known modules (one for training, one held out). Modules missing from an
installation are skipped, so the exact bytes can differ between CPython versions, but on one
installation everything is deterministic: the held-out windows are fixed, and the training
batch of step ``t`` depends only on ``(seed, t)``.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VOCAB_SIZE = 256
"""Byte-level vocabulary: one token per byte value."""

DOCUMENT_SEPARATOR = b"\x00"
"""Placed between files (NUL never occurs in stdlib sources)."""

# Each entry is tried as ``<name>.py`` and then as ``<name>/__init__.py`` (some modules, e.g.
# ``re``, ``pathlib`` and ``zipfile``, became packages in later versions). Sorted; disjoint.
TRAIN_MODULES: tuple[str, ...] = (
    "abc",
    "argparse",
    "ast",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "difflib",
    "enum",
    "fnmatch",
    "fractions",
    "functools",
    "glob",
    "gzip",
    "heapq",
    "inspect",
    "ipaddress",
    "json",
    "locale",
    "logging",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pickle",
    "platform",
    "pprint",
    "queue",
    "random",
    "re",
    "selectors",
    "shlex",
    "shutil",
    "socket",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "tokenize",
    "traceback",
    "typing",
    "uuid",
    "warnings",
    "weakref",
    "zipfile",
)

HELDOUT_MODULES: tuple[str, ...] = (
    "codecs",
    "decimal",
    "getopt",
    "gettext",
    "hashlib",
    "numbers",
    "sched",
    "secrets",
    "timeit",
    "types",
)


def stdlib_dir() -> Path:
    """The directory of this interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def _module_file(root: Path, name: str) -> Path | None:
    for candidate in (root / f"{name}.py", root / name / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_files(names: tuple[str, ...], root: Path | None = None) -> list[Path]:
    """The source files of ``names`` under ``root`` (default: the stdlib), missing ones skipped."""
    root = stdlib_dir() if root is None else root
    found = (_module_file(root, name) for name in names)
    return [path for path in found if path is not None]


def read_tokens(paths: list[Path]) -> np.ndarray:
    """The bytes of ``paths``, in order, joined by :data:`DOCUMENT_SEPARATOR`, as ``uint8``."""
    data = DOCUMENT_SEPARATOR.join(path.read_bytes() for path in paths)
    return np.frombuffer(data, dtype=np.uint8)


@dataclass(frozen=True)
class ByteCorpus:
    """Training and held-out byte streams.

    Attributes:
      train: ``uint8`` tokens of the training modules.
      heldout: ``uint8`` tokens of the held-out modules.
      train_files: the files read for ``train``, in order.
      heldout_files: the files read for ``heldout``, in order.
    """

    train: np.ndarray
    heldout: np.ndarray
    train_files: tuple[Path, ...]
    heldout_files: tuple[Path, ...]

    def train_batch(self, seed: int, step: int, batch_size: int, seq_len: int) -> np.ndarray:
        """The training batch of ``step``: ``batch_size`` random windows of ``seq_len + 1`` bytes.

        A pure function of ``(seed, step)``, so a run can be replayed or resumed exactly.
        """
        return random_windows(self.train, seed, step, batch_size, seq_len)

    def eval_batches(
        self, split: str, num_batches: int, batch_size: int, seq_len: int
    ) -> np.ndarray:
        """Fixed, evenly spaced windows of ``split`` (``"train"`` or ``"heldout"``).

        Returns an array of shape ``(num_batches, batch_size, seq_len + 1)``; it does not depend
        on any seed, so every run is evaluated on the same text.
        """
        if split not in ("train", "heldout"):
            raise ValueError(f"eval_batches: split must be 'train' or 'heldout', got {split!r}.")
        tokens = self.train if split == "train" else self.heldout
        count = num_batches * batch_size
        windows = evenly_spaced_windows(tokens, count, seq_len)
        return windows.reshape(num_batches, batch_size, seq_len + 1)


def random_windows(
    tokens: np.ndarray, seed: int, step: int, batch_size: int, seq_len: int
) -> np.ndarray:
    """``batch_size`` windows of ``seq_len + 1`` tokens at offsets drawn from ``(seed, step)``."""
    _check_length(tokens, seq_len)
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, tokens.size - seq_len, size=batch_size)
    return np.stack([tokens[s : s + seq_len + 1] for s in starts])


def evenly_spaced_windows(tokens: np.ndarray, count: int, seq_len: int) -> np.ndarray:
    """``count`` windows of ``seq_len + 1`` tokens whose starts are evenly spaced."""
    _check_length(tokens, seq_len)
    starts = np.linspace(0, tokens.size - seq_len - 1, num=count).astype(np.int64)
    return np.stack([tokens[s : s + seq_len + 1] for s in starts])


def _check_length(tokens: np.ndarray, seq_len: int) -> None:
    if tokens.size <= seq_len + 1:
        raise ValueError(
            f"corpus of {tokens.size} bytes is too short for windows of {seq_len + 1} bytes."
        )


def load_corpus(root: Path | None = None) -> ByteCorpus:
    """Reads the training and held-out modules from ``root`` (default: this stdlib).

    Raises:
      FileNotFoundError: if none of the training or none of the held-out modules exists.
    """
    root = stdlib_dir() if root is None else Path(root)
    train_files = module_files(TRAIN_MODULES, root)
    heldout_files = module_files(HELDOUT_MODULES, root)
    if not train_files or not heldout_files:
        raise FileNotFoundError(
            f"no Python standard library sources found under {root} (expected files such as "
            f"{root / 'argparse.py'}); the embedded task needs the stdlib .py files."
        )
    return ByteCorpus(
        train=read_tokens(train_files),
        heldout=read_tokens(heldout_files),
        train_files=tuple(train_files),
        heldout_files=tuple(heldout_files),
    )
