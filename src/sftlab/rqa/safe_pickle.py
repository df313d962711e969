"""A restricted unpickler for LocalRQA document pickles.

LocalRQA stores its collection as a pickled list of Document objects (its own dataclass, or langchain's
pydantic model). Unpickling normally imports whatever module a pickle names and calls whatever it asks
for, so a pickle is code. This reader never imports anything: `find_class` hands out inert stand-ins for
an allow-list of Document class paths plus a few harmless builtins, and refuses every other global with a
DataError naming the file and the global. The stand-ins only collect field values; the result is turned
into plain `Document` records.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from sftlab.errors import DataError
from sftlab.rqa.schema import Document

# Class paths under which Document objects have been pickled by LocalRQA and langchain versions.
DOCUMENT_CLASS_PATHS = frozenset(
    {
        ("local_rqa.schema.document", "Document"),
        ("rqa.schema.document", "Document"),
        ("langchain_core.documents.base", "Document"),
        ("langchain_core.documents", "Document"),
        ("langchain.schema.document", "Document"),
        ("langchain.schema", "Document"),
        ("langchain.docstore.document", "Document"),
    }
)


class _DocumentStandIn:
    """Receives whatever state a pickled Document carries; never runs code from the pickle."""

    __slots__ = ("fields",)

    def __new__(cls, *args: Any, **kwargs: Any) -> "_DocumentStandIn":
        # NEWOBJ calls __new__ without __init__, so the field store is created here.
        self = object.__new__(cls)
        self.fields = {}
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Reached only via REDUCE/INST on the stand-in class itself: positional args follow LocalRQA's
        # dataclass field order (page_content, fmt_content, metadata).
        self.fields.update(zip(("page_content", "fmt_content", "metadata"), args))
        self.fields.update(kwargs)

    def __setstate__(self, state: Any) -> None:
        # Forms seen in the wild: a plain __dict__ (dataclass); pydantic v1 {'__dict__', '__fields_set__'};
        # pydantic v2 {'__dict__', '__pydantic_fields_set__', ...}; (dict_state, slot_state) tuples.
        if isinstance(state, tuple) and len(state) == 2:
            for part in state:
                self.__setstate__(part)
            return
        if state is None:
            return
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected Document state of type {type(state).__name__}")
        inner = state.get("__dict__")
        self.fields.update(inner if isinstance(inner, dict) else state)


def _make_stand_in_class(module: str, name: str) -> type:
    cls = type(name, (_DocumentStandIn,), {"__slots__": ()})
    cls._sftlab_class_path = f"{module}.{name}"  # type: ignore[attr-defined]
    return cls


def _safe_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """copyreg._reconstructor as protocols 0/1 use it, limited to stand-ins built on `object`."""
    if not (isinstance(cls, type) and issubclass(cls, _DocumentStandIn)) or base is not object or state is not None:
        raise pickle.UnpicklingError("copyreg._reconstructor used for something other than a Document")
    return cls.__new__(cls)


def _safe_newobj(cls: Any, *args: Any) -> Any:
    if not (isinstance(cls, type) and issubclass(cls, _DocumentStandIn)):
        raise pickle.UnpicklingError("copyreg.__newobj__ used for something other than a Document")
    return cls.__new__(cls)


def _safe_codecs_encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """Protocol 2 pickles bytes as _codecs.encode(str, 'latin1'); allow exactly that."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is allowed only for latin1 bytes")
    return text.encode("latin1")


# Harmless globals that ordinary pickles of plain data reference (sets in protocol 2, OrderedDict metadata).
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("copyreg", "_reconstructor"): _safe_reconstructor,
    ("copyreg", "__newobj__"): _safe_newobj,
    ("copy_reg", "_reconstructor"): _safe_reconstructor,
    ("builtins", "object"): object,
    ("__builtin__", "object"): object,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
    ("collections", "OrderedDict"): dict,
    ("_codecs", "encode"): _safe_codecs_encode,
}


def _display_global(module: str, name: str) -> str:
    """`module.name`, plus the Python 3 spelling when a protocol 0-2 pickle uses a Python 2 name."""
    import _compat_pickle

    py3 = _compat_pickle.NAME_MAPPING.get((module, name))
    if py3 is None and module in _compat_pickle.IMPORT_MAPPING:
        py3 = (_compat_pickle.IMPORT_MAPPING[module], name)
    shown = f"'{module}.{name}'"
    return f"{shown} (Python 3: '{py3[0]}.{py3[1]}')" if py3 else shown


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, display_name: str) -> None:
        super().__init__(file)
        self._display_name = display_name
        self._stand_ins: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in DOCUMENT_CLASS_PATHS:
            if key not in self._stand_ins:
                self._stand_ins[key] = _make_stand_in_class(module, name)
            return self._stand_ins[key]
        if key in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[key]
        raise DataError(
            f"refusing to load global {_display_global(module, name)} from a pickle: only LocalRQA/langchain Document "
            "objects can be read (a pickle can run arbitrary code, so nothing else is imported)",
            file=self._display_name,
        )

    def persistent_load(self, pid: Any) -> Any:
        raise DataError("refusing a pickle that uses persistent ids", file=self._display_name)


def safe_load_pickle(path: str | Path) -> Any:
    """Unpickle `path` with the restricted unpickler; Documents come back as stand-in objects."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return _RestrictedUnpickler(f, str(path)).load()
    except DataError:
        raise
    except Exception as e:  # truncated file, bad opcodes, unexpected state, ...
        raise DataError(f"cannot read document pickle: {type(e).__name__}: {e}", file=str(path)) from None


def load_document_pickle(path: str | Path) -> list[Document]:
    """Read a LocalRQA documents pickle (a list/tuple of Document objects) into Document records."""
    obj = safe_load_pickle(path)
    if not isinstance(obj, (list, tuple)):
        raise DataError(f"expected a pickled list of Documents, got {type(obj).__name__}", file=str(path))
    docs = []
    for i, item in enumerate(obj):
        if not isinstance(item, _DocumentStandIn):
            raise DataError(f"item {i} is a {type(item).__name__}, not a Document", file=str(path))
        docs.append(_to_record(item, i, str(path)))
    return docs


def _to_record(item: _DocumentStandIn, index: int, display_name: str) -> Document:
    fields = item.fields
    content = fields.get("page_content")
    if not isinstance(content, str):
        raise DataError(f"Document {index} has no string page_content", file=display_name, field="page_content")
    metadata = fields.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise DataError(f"Document {index} metadata is not a dict", file=display_name, field="metadata")
    metadata = dict(metadata)
    fmt = fields.get("fmt_content")
    if not fmt:
        # LocalRQA's to_langchain_doc() stores fmt_content inside metadata; take it back out.
        fmt = metadata.pop("fmt_content", "") if isinstance(metadata.get("fmt_content"), str) else ""
    if not isinstance(fmt, str):
        raise DataError(f"Document {index} fmt_content is not a string", file=display_name, field="fmt_content")
    return Document(page_content=content, fmt_content=fmt, metadata=metadata)
