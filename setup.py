"""Maps the product's top-level folders onto the `ikefarm.` import namespace.

The folders are the layout of docs/architecture.md (proto, shared, services); the import
names live under `ikefarm.` so nothing called `shared` or `proto` lands bare in
site-packages. Packages are discovered so a new module needs no edit here.
"""

from setuptools import find_packages, setup

FOLDER_TO_PACKAGE = {
    "proto": "ikefarm.proto",
    "shared": "ikefarm.shared",
    "services": "ikefarm.services",
}

packages: list[str] = []
package_dir: dict[str, str] = {}
for folder, package in FOLDER_TO_PACKAGE.items():
    package_dir[package] = folder
    packages.append(package)
    packages.extend(f"{package}.{sub}" for sub in find_packages(folder))

setup(packages=packages, package_dir=package_dir)
