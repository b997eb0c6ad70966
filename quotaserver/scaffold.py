"""``quotaserver new-plugin NAME --dir DIR``: a complete, installable plugin package.

It writes a pyproject with the ``quotaserver`` entry point, the plugin module (a periodic
source with a stats field, its settings validated), a README and a test that starts the
real server through :mod:`quotaserver.testing`. ``pip install -e DIR && pytest DIR`` passes
as generated.
"""

from __future__ import annotations

import os
import re
from string import Template

from . import __version__
from .config import ConfigError

NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")

PYPROJECT = Template("""\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "quotaserver plugin: $name"
readme = "README.md"
requires-python = ">=3.11"
dependencies = ["quotaserver>=$version"]

[project.optional-dependencies]
test = ["pytest>=8"]

# quotaserver finds plugins through this entry-point group; the entry point's name is the
# plugin's name in the configuration (plugins: {$name: {interval: 10}}).
[project.entry-points.quotaserver]
$name = "$module"

[tool.setuptools]
py-modules = ["$module"]

[tool.pytest.ini_options]
testpaths = ["tests"]
""")

MODULE = Template('''\
"""$name: a quotaserver plugin.

Publishes the stats field ``$name`` every ``interval`` seconds (default 10).
Settings (``plugins.$name``): ``interval``.
"""

from __future__ import annotations

from typing import Any

from quotaserver import PeriodicEmitter, check_plugin_block, hookimpl, positive_number

__version__ = "0.1.0"

NAME = "$name"


def measure() -> dict[str, Any]:
    """Take one measurement. It runs on a thread of this plugin's own, so it may block."""
    return {"value": 42}


@hookimpl
def validate_config(config: Any) -> list[str]:
    """Unknown keys and bad values stop start-up with exit status 2, naming the key."""
    return check_plugin_block(NAME, config.plugin(NAME), {"interval": positive_number})


@hookimpl
def register_emitters(app: Any) -> list[PeriodicEmitter]:
    interval = float(app.plugin_config(NAME).get("interval", 10.0))
    return [PeriodicEmitter(NAME, interval, measure, blocking=True, stats_field=NAME)]
''')

TEST = Template('''\
"""Runs the real quotaserver with this plugin installed (pip install -e .)."""


def test_the_plugin_is_installed_and_listed(quotaserver_server):
    server = quotaserver_server(plugins={"$name": {"interval": 0.1}})
    plugins = {p["name"]: p for p in server.get("/api/plugins")["plugins"]}
    assert plugins["$name"]["source"] == "entry point"
    assert plugins["$name"]["version"] == "0.1.0"
    assert plugins["$name"]["hooks"] == ["register_emitters", "validate_config"]


def test_the_stats_field_reaches_clients(quotaserver_server):
    server = quotaserver_server(plugins={"$name": {"interval": 0.1}})
    with server.stream() as stream:
        stats = stream.wait_for_stats(lambda s: "$name" in s)
    assert stats["$name"] == {"value": 42}
    health = server.health()
    assert [s["healthy"] for s in health["sources"] if s["name"] == "$name"] == [True]
''')

README = Template("""\
# $dist

A quotaserver plugin: publishes the stats field `$name`.

## Install

```bash
pip install -e .          # or: pip install $dist
quotaserver plugins       # $name is listed (source: entry point)
```

## Configure

```yaml
plugins:
  $name:
    interval: 10          # seconds between measurements
```

or `QUOTASERVER_PLUGINS_${env}_INTERVAL=10`.

## Test

```bash
pip install -e '.[test]'
pytest                    # starts the real server with this plugin (quotaserver.testing)
```
""")


def write_plugin(name: str, directory: str) -> list[str]:
    """Write the package for plugin ``name`` into ``directory``; return the files written.

    Raises :class:`ConfigError` for a bad name or a directory that is not empty.
    """
    if not NAME.match(name):
        raise ConfigError(
            f"new-plugin: invalid name {name!r}: lowercase letters, digits and _, "
            "starting with a letter"
        )
    if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
        raise ConfigError(f"new-plugin: {directory} exists and is not an empty directory")
    values = {
        "name": name,
        "dist": "quotaserver-" + name.replace("_", "-"),
        "module": f"quotaserver_{name}",
        "env": name.upper(),
        "version": __version__,
    }
    files = {
        "pyproject.toml": PYPROJECT,
        f"quotaserver_{name}.py": MODULE,
        "README.md": README,
        os.path.join("tests", f"test_{name}.py"): TEST,
    }
    written = []
    for relative, template in files.items():
        path = os.path.join(directory, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(template.substitute(values))
        written.append(path)
    return written
