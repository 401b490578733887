"""The README stays true: every command in its code blocks names a module that exists,
flags that module accepts, and files that exist. (The commands themselves run in the tests
named next to them; .ci/run runs test.sh, quickstart.sh and the report.)"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _commands():
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                yield line


def test_readme_modules_flags_and_files_exist():
    cmds = list(_commands())
    assert len(cmds) >= 8
    for cmd in cmds:
        argv = shlex.split(cmd)
        if "-m" in argv:
            mod = argv[argv.index("-m") + 1]
            if mod.startswith("ospo"):
                spec = importlib.util.find_spec(mod)
                assert spec is not None, f"README names module {mod} that does not exist: {cmd}"
                src = Path(spec.origin).read_text()
                if mod == "ospo.run":
                    src += (ROOT / "ospo" / "run.py").read_text()
                for flag in (a.split("=")[0] for a in argv[argv.index("-m") + 2:] if a.startswith("--")):
                    assert f'"{flag}"' in src, f"{mod} has no flag {flag}: {cmd}"
        for a in argv:
            if a.startswith(("configs/", "./scripts/", "scripts/", "ospo/")) and "{" not in a:
                assert (ROOT / a.lstrip("./")).exists() or (ROOT / a).exists(), f"README names missing {a}"


def test_readme_has_no_stale_status():
    assert "not implemented yet" not in README
    assert "in progress" not in README
