"""The built-in plugins are written against the public API a third party gets: they import
quotaserver's top level (its ``__all__``) and nothing under it; the rest of what they use
comes with the hooks (the app, the messages)."""

from __future__ import annotations

import ast
import pathlib

import pytest

import quotaserver

PLUGINS = pathlib.Path(__file__).resolve().parent.parent / "plugins"
FILES = sorted(p for p in PLUGINS.rglob("*.py") if "build" not in p.parts)


def reaches_into_quotaserver(source: str) -> list[str]:
    """Each import of quotaserver that is not a public top-level name, as written."""
    wrong = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            wrong += [a.name for a in node.names if a.name.startswith("quotaserver.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("quotaserver."):
                wrong.append(f"from {node.module} import ...")
            elif node.module == "quotaserver":
                wrong += [
                    f"from quotaserver import {a.name}"
                    for a in node.names
                    if a.name not in quotaserver.__all__
                ]
    return wrong


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PLUGINS)))
def test_a_built_in_plugin_imports_only_the_public_api(path):
    assert reaches_into_quotaserver(path.read_text(encoding="utf-8")) == []


def test_the_check_refuses_each_way_of_reaching_in():
    source = "\n".join(
        [
            "import quotaserver.models",
            "from quotaserver.db import Store",
            "from quotaserver import hookimpl, QuotaApp",
            "from quotaserver import readings",
            "from . import notify_send",
            "import peewee",
        ]
    )
    assert reaches_into_quotaserver(source) == [
        "quotaserver.models",
        "from quotaserver.db import ...",
        "from quotaserver import QuotaApp",
    ]


def test_every_public_name_is_there():
    for name in quotaserver.__all__:
        assert hasattr(quotaserver, name), name
