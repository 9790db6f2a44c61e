"""Packaging: every third-party package the module imports is declared in install_requires.

Synapse is the host (never an install requirement) and the standard library needs no
declaration; everything else the code imports must be installed by
`pip install synapse-msc3916`, even when Synapse happens to pull it in today, or a Synapse
release that drops it breaks the module with an ImportError at start-up.
"""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "synapse_msc3916"
# The host and the module itself.
NOT_REQUIREMENTS = {"synapse", "synapse_msc3916"}


def _normalise(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _guards_import_error(node: ast.Try) -> bool:
    """True if the ``try`` has an ``except ImportError`` (or ModuleNotFoundError) handler."""
    for handler in node.handlers:
        types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        if any(isinstance(t, ast.Name) and t.id in ("ImportError", "ModuleNotFoundError") for t in types):
            return True
    return False


def third_party_imports(source: str) -> set[str]:
    """Top-level names of the absolute imports in ``source`` outside the standard library.

    Imports inside a ``try`` that catches ImportError are optional (e.g. psycopg2, needed
    only for a PostgreSQL database, with a clear error when missing) and are left out.
    """
    found: set[str] = set()

    def visit(node: ast.AST, optional: bool) -> None:
        if isinstance(node, ast.Import) and not optional:
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not optional and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        if isinstance(node, ast.Try) and _guards_import_error(node):
            for child in node.body:
                visit(child, True)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child, optional)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, optional)

    visit(ast.parse(source), False)
    return {name for name in found if name not in sys.stdlib_module_names and name not in NOT_REQUIREMENTS}


def install_requires() -> set[str]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    names = set()
    for line in parser["options"]["install_requires"].splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(_normalise(re.split(r"[\s\[<>=!~;]", line, maxsplit=1)[0]))
    return names


def test_import_finder_sees_nested_and_skips_optional_imports() -> None:
    # Guards the finder itself, so the real check below cannot pass by seeing nothing.
    source = (
        "import os\nimport yaml.loader\nfrom attr import s\nfrom . import sibling\n"
        "def f():\n    from botocore.config import Config\n"
        "try:\n    import psycopg2\nexcept ImportError:\n    pass\n"
        "import synapse.module_api\n"
    )
    assert third_party_imports(source) == {"yaml", "attr", "botocore"}


def test_every_third_party_import_is_declared_in_install_requires() -> None:
    # Before the fix this failed with: missing {'yaml': ['PyYAML'], 'prometheus_client':
    # ['prometheus_client'], 'unpaddedbase64': [...], 'zope': ['zope.interface'], 'botocore': [...]}.
    imported: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for name in third_party_imports(path.read_text()):
            imported.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    assert {"boto3", "yaml", "prometheus_client"} <= set(imported)  # the scan really found imports

    declared = install_requires()
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for name, files in sorted(imported.items()):
        # The distribution(s) that install this import name in the test venv (attr -> attrs,
        # yaml -> PyYAML); an import no installed distribution provides is reported as is.
        dists = distributions.get(name, [name])
        if not any(_normalise(d) in declared for d in dists):
            missing[name] = (dists, sorted(files))
    assert not missing, f"imported but not in setup.cfg install_requires: {missing}"
