"""Text <-> token ids: a checkpoint's tokenizer.json (HF `tokenizers`) or, for random presets, bytes.

Torch-free. The byte fallback maps UTF-8 bytes to ids 0..255 so that presets can take `--prompt`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids (ids >= 256 decode to nothing): enough to drive random presets."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A checkpoint's tokenizer.json through the `tokenizers` library."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        self._tok = _Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(checkpoint_dir: Path | None, vocab_size: int) -> Tokenizer | None:
    """tokenizer.json of the checkpoint if present; bytes for a preset whose vocab covers them."""
    if checkpoint_dir is not None:
        path = Path(checkpoint_dir) / "tokenizer.json"
        return HFTokenizer(path) if path.is_file() else None
    return ByteTokenizer() if vocab_size >= 256 else None
