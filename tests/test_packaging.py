"""What `pip install .` puts in a wheel: every package the code imports."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_installed():
    """setup.py named its packages by hand and left out echox.batch: from a wheel, `import
    echox.engine` failed (an editable install hid it, reading the checkout)."""
    probe = ("import json, runpy, setuptools; setuptools.setup = lambda **kw: print(json.dumps(kw['packages'])); "
             "runpy.run_path('setup.py')")
    run = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    packages = set(json.loads(run.stdout.strip().splitlines()[-1]))
    on_disk = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "echox").rglob("__init__.py")}
    assert on_disk <= packages and "echox.batch" in packages and "echox_kernels" in packages
