"""The restricted unpickler: reads LocalRQA/langchain Document pickles, refuses anything that could run code.

Pickles are produced the way LocalRQA and langchain produce them: classes registered under their real module
paths (fake modules inserted into sys.modules only while pickling), pickled with the standard pickler.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
import types
from dataclasses import dataclass, field

import pytest

from sftlab.errors import DataError
from sftlab.rqa.documents import Document, load_documents
from sftlab.rqa.safe_pickle import load_document_pickle

DOCS = [
    ("Corvish Lighthouse opened in 1851.", "", {"source": "https://w.example/corvish", "title": "Corvish Lighthouse"}),
    ("Kelpbrick was invented in 1931.", "FMT kelpbrick", {"source": "https://w.example/kelpbrick", "title": "Kelpbrick"}),
]


@contextlib.contextmanager
def registered_as(cls: type, module: str, name: str = "Document"):
    """Make `cls` picklable as `module.name`, as if that package were installed; undone afterwards."""
    parts = module.split(".")
    names = [".".join(parts[: i + 1]) for i in range(len(parts))]
    saved = {n: sys.modules.get(n) for n in names}
    cls.__module__, cls.__qualname__, cls.__name__ = module, name, name
    leaf = types.ModuleType(module)
    setattr(leaf, name, cls)
    try:
        for n in names:
            sys.modules[n] = leaf if n == module else types.ModuleType(n)
        yield
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def localrqa_dataclass():
    @dataclass
    class Doc:  # LocalRQA's own Document: a dataclass with these three fields
        page_content: str
        fmt_content: str = field(default="")
        metadata: dict = field(default_factory=dict)

    return Doc


def langchain_pydantic_v2():
    from pydantic import BaseModel

    class Doc(BaseModel):  # langchain_core's Document is a pydantic v2 model (page_content, metadata, id, type)
        page_content: str
        metadata: dict = {}
        id: str | None = None
        type: str = "Document"

    return Doc


def pydantic_v1_style():
    class Doc:  # pydantic v1 pickles its state as {'__dict__': ..., '__fields_set__': ...}
        def __init__(self, page_content, metadata):
            self.page_content, self.metadata = page_content, metadata

        def __getstate__(self):
            return {"__dict__": dict(self.__dict__), "__fields_set__": {"page_content", "metadata"}}

        def __setstate__(self, state):  # pragma: no cover - only the pickler side is used
            self.__dict__.update(state["__dict__"])

    return Doc


def expected_records(with_fmt: bool) -> list[Document]:
    return [Document(c, f if with_fmt else "", dict(m)) for c, f, m in DOCS]


@pytest.mark.parametrize("protocol", [0, 2, 3, 4, 5])
@pytest.mark.parametrize("module", ["local_rqa.schema.document", "rqa.schema.document"])
def test_localrqa_dataclass_pickles(tmp_path, protocol, module):
    Doc = localrqa_dataclass()
    with registered_as(Doc, module):
        data = pickle.dumps([Doc(c, f, m) for c, f, m in DOCS], protocol=protocol)
    assert module.split(".")[0] not in sys.modules
    path = tmp_path / "documents.pkl"
    path.write_bytes(data)
    docs = load_documents(path)
    assert docs == expected_records(with_fmt=True)
    if protocol >= 2:  # detected by content, whatever the file is called
        renamed = tmp_path / "documents.bin"
        renamed.write_bytes(data)
        assert load_documents(renamed) == docs
    assert docs[0].fmt_content == "Source: https://w.example/corvish\nTitle: Corvish Lighthouse\nContent:\nCorvish Lighthouse opened in 1851."
    # Nothing was imported to read it.
    assert module.split(".")[0] not in sys.modules


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize(
    "module", ["langchain_core.documents.base", "langchain.schema.document", "langchain.docstore.document"]
)
def test_langchain_pydantic_v2_pickles(tmp_path, protocol, module):
    Doc = langchain_pydantic_v2()
    with registered_as(Doc, module):
        objs = [Doc(page_content=c, metadata=m) for c, _, m in DOCS]
        # LocalRQA's to_langchain_doc() keeps fmt_content inside metadata; it must come back out.
        objs[1].metadata = {**objs[1].metadata, "fmt_content": "FMT kelpbrick"}
        data = pickle.dumps(objs, protocol=protocol)
    path = tmp_path / "lc.pkl"
    path.write_bytes(data)
    assert load_document_pickle(path) == expected_records(with_fmt=True)


@pytest.mark.parametrize("protocol", [2, 5])
def test_pydantic_v1_state_shape(tmp_path, protocol):
    Doc = pydantic_v1_style()
    with registered_as(Doc, "langchain.schema"):
        data = pickle.dumps([Doc(c, m) for c, _, m in DOCS], protocol=protocol)
    path = tmp_path / "v1.pkl"
    path.write_bytes(data)
    assert load_document_pickle(path) == expected_records(with_fmt=False)


class _Evil:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("protocol", [0, 2, 5])
@pytest.mark.parametrize("kind", ["os.system", "exec", "eval", "subprocess", "nested_in_metadata", "getattr"])
def test_malicious_pickles_are_refused_and_never_run(tmp_path, protocol, kind):
    marker = tmp_path / "pwned"
    cmd = f"touch {marker}"
    if kind == "os.system":
        payload, refused = _Evil(os.system, (cmd,)), "system"
    elif kind == "exec":
        payload, refused = _Evil(exec, (f"open({str(marker)!r}, 'w').close()",)), ".exec"
    elif kind == "eval":
        payload, refused = _Evil(eval, (f"open({str(marker)!r}, 'w')",)), ".eval"
    elif kind == "subprocess":
        payload, refused = _Evil(subprocess.call, (["touch", str(marker)],)), "subprocess.call"
    elif kind == "getattr":
        payload, refused = _Evil(getattr, ("text", "upper")), ".getattr"
    else:
        Doc = localrqa_dataclass()
        with registered_as(Doc, "local_rqa.schema.document"):
            data = pickle.dumps([Doc("x", "", {"evil": _Evil(os.system, (cmd,))})], protocol=protocol)
        payload, refused = None, "system"
    if payload is not None:
        data = pickle.dumps([payload], protocol=protocol)
    path = tmp_path / "evil.pkl"
    path.write_bytes(data)
    with pytest.raises(DataError) as ei:
        load_documents(path)
    msg = str(ei.value)
    assert str(path) in msg and refused in msg and "refusing" in msg
    assert not marker.exists()
    # Sanity check that the payload is live: the ordinary unpickler would have run it.
    if kind in ("os.system", "exec"):
        pickle.loads(data)
        assert marker.exists()


def test_other_classes_and_shapes_are_refused(tmp_path):
    class Other:
        pass

    with registered_as(Other, "mypkg.models", "Other"):
        data = pickle.dumps([Other()], protocol=4)
    p = tmp_path / "other.pkl"
    p.write_bytes(data)
    with pytest.raises(DataError, match="mypkg.models.Other"):
        load_documents(p)

    p.write_bytes(pickle.dumps({"page_content": "not a list of documents"}))
    with pytest.raises(DataError, match="list of Documents"):
        load_documents(p)

    p.write_bytes(pickle.dumps(["plain string"]))
    with pytest.raises(DataError, match="item 0"):
        load_documents(p)

    p.write_bytes(pickle.dumps([1, 2, 3])[:-3])  # truncated
    with pytest.raises(DataError, match=str(p)):
        load_documents(p)


def test_bytes_and_sets_in_metadata_protocol2(tmp_path):
    # Protocol 2 spells bytes as _codecs.encode(..., 'latin1') and sets as builtins.set(...): both allowed.
    Doc = localrqa_dataclass()
    meta = {"source": "s", "title": "t", "raw": b"\x00\xffab", "tags": {"a"}}
    with registered_as(Doc, "local_rqa.schema.document"):
        data = pickle.dumps([Doc("body", "", meta)], protocol=2)
    p = tmp_path / "p2.pkl"
    p.write_bytes(data)
    (doc,) = load_document_pickle(p)
    assert doc.metadata == meta
