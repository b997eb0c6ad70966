"""Plugin files written for a test, and the hook list with the page that documents it."""

from __future__ import annotations

import os
import textwrap

from quotaserver import hookspecs

HOOKS = sorted(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "quotaserver_spec"))
DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "plugins.md")


def plugin_dir(tmp_path, **files):
    directory = tmp_path / "plugins"
    directory.mkdir(exist_ok=True)
    for name, text in files.items():
        (directory / f"{name}.py").write_text(textwrap.dedent(text))
    return str(directory)
