"""The workspace tree of a tenant (pure): one definition of "a workspace and its subtree", used by
document 004's reach (query_api/routers/row_usage.py) and by a usage key's scope (ingest/scope.py),
so that what a key may read and what it may report for are the same workspaces."""

from __future__ import annotations

from collections.abc import Mapping


def subtree(parents: Mapping[str, str], root: str) -> frozenset[str]:
    """``root`` and every workspace beneath it, from ``workspace id -> parent id`` ("" for a root
    workspace). An unknown ``root`` has no subtree; a cycle in bad data cannot loop forever."""
    children: dict[str, list[str]] = {}
    for child, parent in parents.items():
        if parent and parent != child:
            children.setdefault(parent, []).append(child)
    seen: set[str] = set()
    stack = [root] if root in parents else []
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(children.get(current, ()))
    return frozenset(seen)
