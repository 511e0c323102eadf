"""Packaging for milter-manager."""

from setuptools import find_packages, setup

setup(
    name="milter-manager",
    version="0.1.0",
    description="A milter that runs other milters: one MTA connection, many child milters",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="GPL-3.0-or-later",
    python_requires=">=3.11",
    packages=find_packages(include=["miltermanager", "miltermanager.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/milter_manager_plugin.py"]},
    install_requires=[
        "twisted>=22.4",
        "zope.interface",
        "ldap3",
        "pyasn1",
    ],
    extras_require={"test": ["hypothesis", "dkimpy"]},
    entry_points={
        "console_scripts": [
            "milter-test-server = miltermanager.tools.test_server:main",
            "milter-test-client = miltermanager.tools.test_client:main",
            "milter-manager-import-config = miltermanager.tools.import_config:main",
            "milter-manager-greylist = miltermanager.greylist.main:main",
        ],
    },
)
