"""The record a document collection is made of (LocalRQA's `schema.document.Document`, as sftlab keeps it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sftlab.data.formats import default_fmt_content


@dataclass
class Document:
    """One retrievable passage. `fmt_content` is filled from the content and metadata when left empty."""

    page_content: str
    fmt_content: str = ""
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.fmt_content:
            self.fmt_content = default_fmt_content(self.page_content, self.metadata)

    @property
    def source(self) -> str | None:
        value = self.metadata.get("source")
        return None if value is None else str(value)

    @property
    def title(self) -> str | None:
        value = self.metadata.get("title")
        return None if value is None else str(value)

    def to_dict(self) -> dict[str, Any]:
        return {"page_content": self.page_content, "fmt_content": self.fmt_content, "metadata": self.metadata}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Document":
        """Build from an rqa-style dict (e.g. an entry of a row's `gold_docs`); `text` stands in for page_content."""
        content = d.get("page_content", d.get("text"))
        return cls(page_content=str(content), fmt_content=d.get("fmt_content") or "", metadata=dict(d.get("metadata") or {}))
