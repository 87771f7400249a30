"""transformers' own common model tests, from the sdist of the installed transformers release, runnable here.

The sdist carries `tests/test_modeling_common.py` (ModelTesterMixin) and `tests/test_configuration_common.py`
(ConfigTester), but not three modules they import: `generation/test_utils.py` (GenerationTesterMixin),
`exporters/test_export.py` (ExportTesterMixin) and `utils/test_configuration_utils.py` (config_common_kwargs). Those
are written in this project (`transformers_standins.py`) and placed where the imports look for them. The package is
built once per virtual environment and transformers version, under `sys.prefix/transformers-tests/VERSION/`
(`make install` builds it; `python tests/transformers_suite.py` does it by hand), and imported as
`transformers_tests`.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

VERSION = transformers.__version__
HOME = Path(sys.prefix) / "transformers-tests" / VERSION
# (module inside the package, what it re-exports from transformers_standins)
STANDINS = {
    "generation/test_utils.py": "GenerationTesterMixin",
    "exporters/test_export.py": "ExportTesterMixin",
    "utils/test_configuration_utils.py": "config_common_kwargs",
}


def fetch(home: Path = HOME) -> Path:
    """Download the sdist of this transformers release from PyPI and unpack its top-level `tests/*.py` into
    `home/transformers_tests/`, with the stand-ins; atomic (a temporary folder renamed into place)."""
    package = home / "transformers_tests"
    if (package / "test_modeling_common.py").is_file():
        return home
    home.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home.parent) as work:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                               f"transformers=={VERSION}", "-d", work], capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"could not download the transformers {VERSION} sdist from PyPI (its tests are run "
                               f"against longctx): {done.stderr.strip()[-500:]}")
        sdist = next(Path(work).glob("transformers-*.tar.gz"))
        staged = Path(work) / "home" / "transformers_tests"
        staged.mkdir(parents=True)
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                parts = Path(member.name).parts
                if len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py") and member.isfile():
                    (staged / parts[2]).write_bytes(archive.extractfile(member).read())
        (staged / "__init__.py").touch()
        for module, name in STANDINS.items():
            path = staged / module
            path.parent.mkdir(exist_ok=True)
            (path.parent / "__init__.py").touch()
            path.write_text(f"from transformers_standins import {name}  # noqa: F401 (longctx's stand-in)\n")
        if home.exists():  # a half-built folder from a killed run
            shutil.rmtree(home)
        os.replace(Path(work) / "home", home)
    return home


def import_path() -> str:
    """The folder to put on sys.path to import `transformers_tests` (fetched first if need be)."""
    return str(fetch())


if __name__ == "__main__":
    print(fetch())
