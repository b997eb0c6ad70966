"""``pip install`` of the built wheel, in a fresh virtualenv, serves the dashboard from anywhere.

Builds the wheel from this checkout, installs it (and its dependencies, through pip's usual
index configuration) into a new venv in a temporary directory, and starts the installed
``quotaserver`` command from another directory with no path to the checkout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from http.cookiejar import CookieJar

import pytest
from services import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "package-test-admin-token-0123456789"


def _run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> str:
    """The bin/ directory of a fresh venv with the wheel installed."""
    base = tmp_path_factory.mktemp("package")
    # A copy of the sources: setuptools reuses a checkout's build/ directory, whose leftovers
    # from older layouts would end up in the wheel.
    source = base / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "data", "*.egg-info", ".pytest_cache", ".hypothesis",
        "__pycache__", ".ruff_cache",
    ))  # fmt: skip
    wheels = base / "wheels"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(source))
    (wheel,) = wheels.glob("quotaserver-*.whl")
    venv = base / "venv"
    _run(sys.executable, "-m", "venv", str(venv))
    _run(str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel))
    return str(venv / "bin")


def test_the_installed_code_is_not_the_checkout(installed, tmp_path):
    where = _run(
        os.path.join(installed, "python"),
        "-c",
        "import quotaserver, os; print(os.path.dirname(quotaserver.__file__))",
        cwd=tmp_path,
    ).stdout.strip()
    assert not where.startswith(ROOT), where
    for name in ("templates/admin_quotas_dashboard.html", "static/js/admin_quotas.js"):
        assert os.path.isfile(os.path.join(where, name)), name
    assert os.path.isfile(os.path.join(where, "conf", "quotaserver.yaml"))


def test_no_top_level_plugins_module_is_installed(installed, tmp_path):
    """plugins/ installs as quotaserver.builtin_plugins; nothing named ``plugins`` at the top."""
    script = (
        "import importlib.util, json, sysconfig, os\n"
        "import quotaserver.builtin_plugins.alert_engine as a\n"
        "from quotaserver.plugins import BUILTIN_PLUGINS\n"
        "site = sysconfig.get_paths()['purelib']\n"
        "print(json.dumps({'spec': importlib.util.find_spec('plugins') is not None,\n"
        "  'top': sorted(n for n in os.listdir(site) if not n.endswith(('.dist-info', '.pth'))),\n"
        "  'builtin': a.__file__, 'listed': BUILTIN_PLUGINS}))\n"
    )
    out = _run(os.path.join(installed, "python"), "-c", script, cwd=tmp_path).stdout
    found = json.loads(out)
    assert found["spec"] is False
    assert "plugins" not in found["top"] and "plugins.py" not in found["top"]
    assert not found["builtin"].startswith(ROOT)
    assert found["builtin"].endswith(
        os.path.join("quotaserver", "builtin_plugins", "alert_engine.py")
    )
    assert all(m.startswith("quotaserver.builtin_plugins.") for m in found["listed"])
    listed = _run(os.path.join(installed, "quotaserver"), "plugins", "--json", cwd=tmp_path).stdout
    names = {p["name"] for p in json.loads(listed)["plugins"]}
    assert {"system_metrics", "quota_analytics", "alert_engine"} <= names


def test_the_installed_command_serves_the_dashboard_and_static_files(installed, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QUOTASERVER_", "PYTHON"))}
    env.update(
        {
            "QUOTASERVER_ADMIN_TOKEN": TOKEN,
            "QUOTASERVER_THROTTLE_SOURCE": "off",
            "QUOTASERVER_SERVER_LOG_LEVEL": "warning",
        }
    )
    proc = subprocess.Popen(
        [os.path.join(installed, "quotaserver"), "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        deadline = time.monotonic() + 60
        while not any("listening on" in line for line in lines):
            line = proc.stdout.readline()
            assert line and time.monotonic() < deadline, "".join(lines)
            lines.append(line)
        base = f"http://127.0.0.1:{port}"
        jar = CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        with opener.open(f"{base}/login", timeout=10) as resp:  # the form sets _xsrf
            assert resp.status == 200
        xsrf = next(c.value for c in jar if c.name == "_xsrf")
        form = urllib.parse.urlencode({"token": TOKEN, "_xsrf": xsrf}).encode()
        with opener.open(f"{base}/login", data=form, timeout=10) as resp:
            assert resp.status == 200 and resp.url.endswith("/admin/quotas")
            page = resp.read().decode()
        assert "<html" in page.lower()
        scripts = re.findall(r'src="(/static/[^"]+)"', page)
        assert scripts, page[:500]
        for path in scripts:
            with opener.open(base + path, timeout=10) as resp:
                assert resp.status == 200 and len(resp.read()) > 100
        with opener.open(f"{base}/static/favicon.svg", timeout=10) as resp:
            assert b"<svg" in resp.read()
        # The database was created relative to the working directory, not the package.
        assert (tmp_path / "data" / "quotaserver.db").exists()
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0
