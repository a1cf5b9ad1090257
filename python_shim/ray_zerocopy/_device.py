"""Device strings: ``"cpu"``, ``"cuda"`` (= ``"cuda:0"``), ``"cuda:N"``, or a
``torch.device``."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidInputError


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" or "cuda"
    index: int = 0

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


def parse_device(device) -> Device:
    """Parses a device spec, raising ``ValueError`` that says what is accepted."""
    if isinstance(device, Device):
        return device
    text = str(device).strip().lower() if device is not None else "cpu"
    if text == "cpu":
        return Device("cpu")
    if text == "cuda":
        return Device("cuda", 0)
    if text.startswith("cuda:") and text[5:].isdigit():
        return Device("cuda", int(text[5:]))
    raise InvalidInputError(
        f"device {device!r} is not understood: use 'cpu', 'cuda' or 'cuda:N' (N a GPU index, e.g. 'cuda:0')"
    )
