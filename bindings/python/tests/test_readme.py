"""The README's Python example runs as written (the block after `pip install
./bindings/python`), on whatever device this machine has."""

import pathlib
import re
import subprocess
import sys


def readme():
    """The repository's README: the first README.md above this file with a "From
    Python" section (the tests also run from the GPU bundle, inside the working tree)."""
    for folder in pathlib.Path(__file__).resolve().parents:
        candidate = folder / "README.md"
        if candidate.is_file() and "## From Python" in candidate.read_text():
            return candidate
    raise AssertionError("no README.md with the Python example above " + __file__)


def test_readme_example_runs_as_written(tmp_path):
    text = readme().read_text()
    after = text.split("pip install ./bindings/python", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", after, flags=re.S)
    assert blocks, "the README has no python example"
    script = tmp_path / "example.py"
    script.write_text(blocks[0])
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "pass" in run.stdout, run.stdout
