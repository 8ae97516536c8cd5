"""Package layout: the folders of the repository mapped into the ``cpift`` namespace.

Every folder under a mapped root that holds an ``__init__.py`` is a package of the wheel, found by
walking the tree, so a new subpackage (``merge/io/``, say) cannot drop out of the wheel while an
editable install still imports it. Everything else lives in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup

ROOTS = {
    "cpift": "src/cpift",
    "cpift.kernels": "kernels",
    "cpift.merge": "merge",
    "cpift.training": "training",
    "cpift.cli": "cli",
}


def find_packages() -> list[str]:
    here = Path(__file__).parent
    found = []
    for name, folder in ROOTS.items():
        for init in sorted((here / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(here / folder)
            found.append(".".join([name, *rel.parts]))
    return found


setup(packages=find_packages(), package_dir=ROOTS, package_data={"cpift": ["py.typed"]})
