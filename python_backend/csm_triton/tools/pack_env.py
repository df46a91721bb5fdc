"""A relocatable Python prefix for the python backend's EXECUTION_ENV_PATH parameter, so that
csm_stream brings its own torch, moshi and this project to a server whose own Python, or whose
other models, need other packages.

  python -m csm_triton.tools.pack_env --out build/csm-env   (`make pack-env` then installs the packages)

With EXECUTION_ENV_PATH set, the python backend runs `source <env>/bin/activate` and starts its
stub with `<env>/lib` first on LD_LIBRARY_PATH. The stub embeds whichever libpython it finds there,
which must be the Python version the stub was built for, and takes sys.prefix from the first
`python3` on the PATH. A venv cannot be that prefix anywhere but where it was made: its standard
library stays in the base installation, and its activate script names its own absolute path. So,
like conda-pack's archives, this is a whole prefix: the running interpreter's executable,
libpython and standard library, an empty site-packages, and an activate script that finds its own
directory. It runs wherever the same system libraries are (glibc, OpenSSL, libffi: build it in the
image that serves it), unpacked at any path or packed as a .tar.gz that the backend extracts.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import sysconfig
from pathlib import Path

logger = logging.getLogger(__name__)

# Parts of the standard library that a served model never imports (the test suite alone is 120 MB),
# byte-code caches, and the static library with its build files.
LEFT_OUT = shutil.ignore_patterns("site-packages", "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "__pycache__", "config-*")

ACTIVATE = """\
# Sourced by Triton's python backend before it starts the stub. Relocatable: the environment is
# wherever this script is, so it works unpacked anywhere and extracted from a .tar.gz.
_csm_env="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$_csm_env/bin:$PATH"
export PYTHONNOUSERSITE=1
unset PYTHONHOME PYTHONPATH _csm_env
"""


def build_prefix(out: Path) -> None:
    """A Python prefix at `out` holding the running interpreter and its standard library, with an
    empty site-packages for the packages to install."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    library = f"lib{version}.so.1.0"  # what the stub links
    libdir = Path(sysconfig.get_config_var("LIBDIR"))
    shared = [path for path in (libdir / library, libdir / (sysconfig.get_config_var("MULTIARCH") or "") / library) if path.exists()]
    if not shared:
        raise RuntimeError(f"{sys.executable}: no {library} in {libdir}; the python backend stub needs this Python's shared library")
    base = Path(sys.base_prefix)
    if out.exists():
        shutil.rmtree(out)
    (out / "bin").mkdir(parents=True)
    # A copy, not a link: Python finds its prefix from where the executable really is.
    shutil.copy2(base / "bin" / version, out / "bin" / version)
    (out / "bin" / "python3").symlink_to(version)
    (out / "bin" / "activate").write_text(ACTIVATE)
    shutil.copytree(base / "lib" / version, out / "lib" / version, ignore=LEFT_OUT)
    shutil.copy2(shared[0], out / "lib" / library)
    (out / "lib" / version / "site-packages").mkdir()
    logger.info("Python %s prefix at %s (from %s)", sys.version.split()[0], out, base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the environment's directory (replaced if it exists)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_prefix(args.out.resolve())


if __name__ == "__main__":
    main()
