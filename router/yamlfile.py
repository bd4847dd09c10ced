"""YAML files that remember where each value came from, so errors name ``file:line: field``.

Before a file is built into objects, one pass over its parse events (no recursion) bounds what
building it may cost: at most ``MAX_DEPTH`` levels of nesting (deeper ones would exhaust the
builder's recursion) and ``MAX_NODES`` values once aliases are expanded (an alias bomb of a few
hundred bytes expands to billions). A file past either is one bad file, named with its line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from router.errors import ConfigError

Loc = tuple[str | int, ...]
# libyaml's loader when PyYAML has it (ten times faster on thousands of instance files).
_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MAX_DEPTH = 50
MAX_NODES = 100_000
_STR, _MAP, _SEQ = "tag:yaml.org,2002:str", "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"
_VALUE = "tag:yaml.org,2002:value"  # a plain ``=``: as a key, PyYAML makes it the string "="
_OPEN = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
_CLOSE = (yaml.MappingEndEvent, yaml.SequenceEndEvent)


@dataclass
class YamlDoc:
    """A parsed YAML mapping and the line (1-based) of every key and list item in it (found
    from ``node`` when first asked: only an error needs a line)."""

    path: Path
    data: dict[str, Any]
    node: yaml.Node | None = None
    _lines: dict[Loc, int] | None = field(default=None, repr=False)

    @property
    def lines(self) -> dict[Loc, int]:
        if self._lines is None:
            self._lines = {}
            if self.node is not None:
                _walk(self.node, (), self._lines)
        return self._lines

    def line_of(self, loc: Sequence[str | int]) -> int:
        """The line of ``loc``, or of its nearest enclosing key that has one."""
        lines, key = self.lines, tuple(loc)
        while key:
            if key in lines:
                return lines[key]
            key = key[:-1]
        return 1

    def where(self, loc: Sequence[str | int]) -> str:
        return f"{self.path}:{self.line_of(loc)}: {format_loc(loc)}"


def format_loc(loc: Sequence[str | int]) -> str:
    """``("webhook", "events", 2)`` -> ``webhook.events[2]``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _walk(node: yaml.Node, loc: Loc, lines: dict[Loc, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = (*loc, str(key_node.value))
            lines[child] = key_node.start_mark.line + 1
            _walk(value_node, child, lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*loc, index)
            lines[child] = item.start_mark.line + 1
            _walk(item, child, lines)


def _line(event: yaml.Event) -> int:
    mark = event.start_mark
    return mark.line + 1 if mark is not None else 1


def _check_bounds(text: str, path: Path) -> None:
    """ConfigError if building ``text`` would nest too deep or expand to too many values."""
    nodes = 0  # values so far, aliases counted as what they stand for
    sizes: dict[str, int] = {}  # anchor -> the number of values it stands for
    open_nodes: list[tuple[str | None, int]] = []  # (anchor, nodes when it opened)
    for event in yaml.parse(text, Loader=_LOADER):
        if isinstance(event, _OPEN):
            open_nodes.append((event.anchor, nodes))
            nodes += 1
            if len(open_nodes) > MAX_DEPTH:
                raise ConfigError([f"{path}:{_line(event)}: nested deeper than {MAX_DEPTH} levels"])
        elif isinstance(event, _CLOSE):
            anchor, before = open_nodes.pop()
            if anchor is not None:
                sizes[anchor] = nodes - before
        elif isinstance(event, yaml.ScalarEvent):
            nodes += 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            nodes += sizes.get(event.anchor or "", 1)
        if nodes > MAX_NODES:
            raise ConfigError(
                [f"{path}:{_line(event)}: more than {MAX_NODES} values once aliases are expanded"]
            )


def _may_alias(text: str) -> bool:
    """Whether ``text`` may hold anchors and aliases (values that stand for others)."""
    return "&" in text or "*" in text


def _within_bounds_anyway(text: str) -> bool:
    """Whether ``text`` cannot break the bounds, seen from its characters alone (most instance
    files, which are then parsed once, not twice): without anchors and aliases no value stands
    for more than itself, and each takes a character of its own or pairs with one that does (an
    empty value with its key or dash); each level of nesting takes a line break, a bracket, or a
    ``-``, ``?`` or ``:`` indicator."""
    return (
        not _may_alias(text)
        and 2 * len(text) + 1 < MAX_NODES
        and sum(text.count(mark) for mark in "\n[{-?:") < MAX_DEPTH
    )


def _read(path: Path) -> bytes:
    """The file's bytes, with plain system calls: less than half of what ``Path.read_text``
    costs, which counts with 10,000 instance files read at start."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _build(node: yaml.Node, text: str, loader: yaml.SafeLoader) -> Any:
    """The data of ``node``, as PyYAML's safe constructor builds it. Without anchors, aliases or
    merge keys (most instance files), mappings, lists and strings are built here directly, a
    third of what PyYAML's constructor costs per value; other values are PyYAML's."""
    if _may_alias(text) or "<<" in text:
        return loader.construct_document(node)
    try:
        return _plain(node, loader)
    except TypeError:  # a key that cannot be one (a list, a mapping): PyYAML names the problem
        return loader.construct_document(node)


def _plain(node: yaml.Node, loader: yaml.SafeLoader) -> Any:
    tag = node.tag
    if tag == _STR:
        return node.value
    if tag == _MAP:
        return {
            key.value if key.tag == _VALUE else _plain(key, loader): _plain(value, loader)
            for key, value in node.value
        }
    if tag == _SEQ:
        return [_plain(item, loader) for item in node.value]
    return loader.construct_object(node, deep=True)  # true, 3, 1.5, null, a date ...


def load_yaml(path: Path) -> YamlDoc:
    """Read ``path`` as a YAML mapping; raise ConfigError naming the file and line if it is not."""
    try:
        text = _read(path).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {exc}"]) from exc
    try:
        if not _within_bounds_anyway(text):
            _check_bounds(text, path)
        loader = _LOADER(text)
        try:
            node = loader.get_single_node()  # parsed once: the lines come from it, the data too
            data = _build(node, text, loader) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{path}{line}: invalid YAML: {problem}"]) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}:1: expected a mapping at the top level"])
    return YamlDoc(path=path, data=data, node=node)
