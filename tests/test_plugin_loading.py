"""Loading plugins from a directory: what is skipped, what breaks loudly, what stays local."""

from __future__ import annotations

import logging

import pytest
from conftest import make_config

from quotaserver.config import ConfigError
from quotaserver.plugins import BUILTIN_PLUGINS, Hooks, get_plugin_manager

BUILTINS = [dotted.rsplit(".", 1)[-1] for dotted in BUILTIN_PLUGINS]

GOOD = """
from quotaserver import hookimpl

@hookimpl
async def on_event(app, message):
    raise RuntimeError("reaction broken")

@hookimpl
def stats_fields(app):
    return {"good": 1}
"""


def test_a_directory_plugin_that_cannot_import_is_logged_and_the_rest_load(tmp_path, caplog):
    directory = tmp_path / "extra"
    directory.mkdir()
    (directory / "good.py").write_text(GOOD)
    (directory / "broken.py").write_text("this is not python\n")
    (directory / "_helper.py").write_text("raise SystemExit('never imported')\n")
    (directory / "notes.txt").write_text("not a plugin")
    config = make_config(tmp_path, plugins_dir=str(directory))
    with caplog.at_level(logging.ERROR, logger="quotaserver.plugins"):
        pm = get_plugin_manager(config)
    assert pm.has_plugin("good") and not pm.has_plugin("broken")
    assert not pm.has_plugin("_helper") and not pm.has_plugin("notes")
    assert "plugin broken (broken.py) failed to load: " in caplog.text


@pytest.mark.gen_test
async def test_a_failing_async_reaction_is_recorded_and_the_others_still_answer(tmp_path):
    directory = tmp_path / "extra"
    directory.mkdir()
    (directory / "good.py").write_text(GOOD)
    only_good = {name: {"enabled": False} for name in BUILTINS}
    config = make_config(tmp_path, plugins=only_good, plugins_dir=str(directory))
    hooks = Hooks(get_plugin_manager(config))
    assert await hooks.call_async("on_event", app=None, message=None) == []
    assert hooks.errors == {"good": "on_event: RuntimeError: reaction broken"}
    assert hooks.call("stats_fields", app=None) == [("good", {"good": 1})]


def test_a_missing_plugins_dir_and_an_unknown_plugin_are_config_errors(tmp_path):
    missing = make_config(tmp_path, plugins_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"^plugins_dir: not a directory: "):
        get_plugin_manager(missing)
    unknown = make_config(tmp_path, plugins={"no_such_thing": {"x": 1}})
    with pytest.raises(ConfigError, match=r"^plugins\.no_such_thing: no such plugin"):
        get_plugin_manager(unknown)
