"""A Jinja chat template rendered once per conversation *shape* rather than several times per row.

`Template.render` renders a conversation 2 x (assistant turns) + 1 times to locate the trained spans, and
`render_prompt` once more; at 0.3-0.5 ms a render, that was most of the cost of tokenizing a row even with the
template compiled once. But most chat templates only ever *print* a message's content: they branch on roles,
positions and flags, never on the text. For such a template the output is a fixed sequence of literal pieces and
contents, decided by the roles of the messages in order and the generation-prompt flag. `render_by_shape` renders
each shape once with placeholder contents, keeps the pieces, and builds every later text by substitution: the same
string the template would render.

Whether a template only prints contents is decided from its syntax tree: every use of ``content`` must be
``message['content']`` / ``message.content`` placed directly in an output expression, alone or joined with ``+`` /
``~``. Anything else (a filter such as ``trim``, a test, a condition on the text, a method call, an assignment) and
every render goes through Jinja. Messages with tool calls, tool results or reasoning, and renders with tool
definitions, always go through Jinja. Tested against direct Jinja renders in tests/data/test_shapes.py.
"""

from __future__ import annotations

import functools

from sftlab.data.jinja import compiled_jinja
from sftlab.errors import DataError

# Placeholders that cannot occur in a template's own text: private-use code points around the content's index.
_OPEN, _CLOSE = "\ue000", "\ue001"
_PIECES: dict[tuple, object] = {}
_MAX_SHAPES = 4096


@functools.lru_cache(maxsize=16)
def prints_content_only(source: str) -> bool:
    """Whether the template uses message contents only by printing them (so contents can be substituted)."""
    from jinja2 import nodes

    tree = compiled_jinja(source).environment.parse(source)
    if _OPEN in source or _CLOSE in source:
        return False

    def is_content(node) -> bool:
        return (isinstance(node, nodes.Getattr) and node.attr == "content") or (
            isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and node.arg.value == "content")

    def walk(node, parents: list) -> bool:
        if is_content(node):
            # Up through string joins only, to the output statement.
            k = len(parents) - 1
            while k >= 0 and isinstance(parents[k], (nodes.Add, nodes.Concat)):
                k -= 1
            return k >= 0 and isinstance(parents[k], nodes.Output)
        if isinstance(node, nodes.Const) and node.value == "content":
            return False  # 'content' used some other way
        return all(walk(child, parents + [node]) for child in node.iter_child_nodes())

    return walk(tree, [])


def _pieces(text: str) -> list:
    """Rendered text with placeholders -> literal strings and content indices, in order."""
    out: list = []
    i = 0
    while True:
        j = text.find(_OPEN, i)
        if j < 0:
            out.append(text[i:])
            return out
        k = text.index(_CLOSE, j)
        out.append(text[i:j])
        out.append(int(text[j + 1:k]))
        i = k + 1


def render_by_shape(template, messages: list[dict], add_generation_prompt: bool) -> str | None:
    """The template's text for role/content message dicts, built from the pieces of their shape; None when the
    template does not only print contents (the caller renders with Jinja then)."""
    source = template.jinja or ""
    if not prints_content_only(source):
        return None
    special = template._special
    key = (source, special.get("bos", ""), special.get("eos", ""), add_generation_prompt,
           tuple(m["role"] for m in messages))
    pieces = _PIECES.get(key)
    if pieces is None:
        pieces = _shape_pieces(template, [m["role"] for m in messages], add_generation_prompt)
        if len(_PIECES) >= _MAX_SHAPES:
            _PIECES.clear()
        _PIECES[key] = pieces
    if pieces is _JINJA:
        return None
    if isinstance(pieces, DataError):
        raise DataError(pieces.detail)
    return _fill(pieces, [m["content"] for m in messages])


_JINJA = object()  # this shape renders through Jinja
# Contents that a template which escapes, trims or re-encodes what it prints would change.
_AWKWARD = ' "q\\u0041\\\n {{x}} <&>\t '


def _shape_pieces(template, roles: list[str], add_generation_prompt: bool):
    """The pieces of one shape; a DataError when the template refuses it; _JINJA when substitution would not
    give what the template renders (checked with awkward contents: quotes, backslashes, newlines, spaces)."""
    def render(contents: list[str]) -> str:
        return template.jinja_render([{"role": r, "content": c} for r, c in zip(roles, contents)],
                                     add_generation_prompt)

    try:
        pieces = _pieces(render([f"{_OPEN}{i}{_CLOSE}" for i in range(len(roles))]))
    except DataError as e:  # the template refuses this shape (raise_exception), so it does every such row
        return e
    awkward = [f"{_AWKWARD}{i}{_AWKWARD}" for i in range(len(roles))]
    try:
        if render(awkward) != _fill(pieces, awkward):
            return _JINJA
    except DataError:
        return _JINJA
    return pieces


def _fill(pieces: list, contents: list[str]) -> str:
    return "".join(contents[p] if isinstance(p, int) else p for p in pieces)
