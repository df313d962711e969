"""A conversation as sftlab reads it from every row format: a list of `Message`s, assistant turns maybe calling
functions (`ToolCall`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ToolCall:
    """One function call an assistant turn makes: the function's name and its arguments (a JSON object)."""

    name: str
    arguments: dict
    id: str | None = None


@dataclass(frozen=True)
class Message:
    role: str  # system, user, assistant or tool
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # assistant turns that call functions
    tool_call_id: str | None = None  # tool turns: the call answered
    name: str | None = None  # tool turns: the function that answered
    reasoning: str | None = None  # assistant turns: the thinking before the answer
    train: bool | None = None  # per-message override of train_on (loss_weight / train fields)
