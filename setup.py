"""Packaging for milter-manager."""

import os
import stat

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# The shipped configuration (etc/) is also package data, miltermanager/etc: the
# embedded configuration and the load paths' last entry, so that a pip or venv
# install has the built-in conditions without an /etc tree. ldap/ holds the LDAP
# schema and an example directory (not configuration: data to load into slapd); its
# README stays out (documentation is for /usr/share/doc, lintian says).
SHIPPED = {"miltermanager.etc": ["*.conf", "applicable-conditions/*", "defaults/*",
                                 "examples/*", "ldap/*.ldif", "ldap/*.schema"]}


class BuildPy(build_py):
    """build_py whose copies of the package data are writable by their owner only.

    The configuration loader refuses files others may write (they run as
    root); a release tarball extracted as root keeps its 0664 modes, which
    would otherwise be installed as they are.
    """

    def run(self):
        super().run()
        for path in self.get_outputs(include_bytecode=False):
            mode = stat.S_IMODE(os.stat(path).st_mode)
            os.chmod(path, mode & ~(stat.S_IWGRP | stat.S_IWOTH))

setup(
    name="milter-manager",
    version="0.1.0",
    description="A milter that runs other milters: one MTA connection, many child milters",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="GPL-3.0-or-later",
    python_requires=">=3.11",
    packages=find_packages(include=["miltermanager", "miltermanager.*"]) + [
        "twisted.plugins", *SHIPPED],
    package_dir={"miltermanager.etc": "etc"},
    # The web interface's scripts and style sheets are files in the package (no CDN).
    package_data={"twisted": ["plugins/milter_manager_plugin.py"],
                  "miltermanager.web": ["static/*"], **SHIPPED},
    cmdclass={"build_py": BuildPy},
    install_requires=[
        "twisted>=22.4",
        "zope.interface",
        "ldap3",
        "pyasn1",
        "prometheus_client",
    ],
    # tls: pyOpenSSL for web.tls_certificate. Not required: once installed, Twisted's
    # endpoints import it in every manager (+13 MiB resident) even without HTTPS.
    extras_require={"test": ["hypothesis", "dkimpy", "selenium", "redis", "twisted[tls]"],
                    "tls": ["twisted[tls]"],
                    "redis": ["redis>=4.3"]},  # milter-manager-greylist --store redis://
    entry_points={
        "console_scripts": [
            "milter-test-server = miltermanager.tools.test_server:main",
            "milter-test-client = miltermanager.tools.test_client:main",
            "milter-manager-import-config = miltermanager.tools.import_config:main",
            "milter-manager-greylist = miltermanager.greylist.main:main",
            "milter-manager-detect = miltermanager.detect.main:main",
            "milter-manager-log-analyzer = miltermanager.tools.log_analyzer:main",
            "milter-manager-ctl = miltermanager.tools.ctl:main",
            "milter-performance-check = miltermanager.tools.performance_check:main",
        ],
    },
)
