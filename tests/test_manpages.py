# -*- test-case-name: tests.test_manpages -*-
"""Tests for the manual pages: scripts/make-manpages writes one per command, with every option.

The pages are generated (as debian/rules does) into a temporary directory once per run,
then rendered with man-db's `man -l` as a reader sees them.
"""

import argparse
import atexit
import os
import re
import shutil
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from miltermanager.config import model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "make-manpages")
CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

_made = {}


def make_pages(*arguments):
    """Run scripts/make-manpages with this test's python3; (exit status, output)."""
    result = subprocess.run(
        [sys.executable, SCRIPT, *arguments], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=120,
        env={"PATH": os.environ.get("PATH", CLEAN_PATH), "LANG": "C.UTF-8",
             "SOURCE_DATE_EPOCH": "1796256000"})
    return result.returncode, result.stdout


def pages():
    """{file name: path} of the pages made from this tree, made once per process."""
    if not _made:
        directory = tempfile.mkdtemp(prefix="milter-manager-test-man.")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        status, output = make_pages(directory)
        if status != 0:
            raise AssertionError(f"make-manpages failed ({status}):\n{output}")
        _made.update((name, os.path.join(directory, name)) for name in os.listdir(directory))
    return _made


def render(path, warnings=False):
    """The page as man shows it (plain ASCII, no line breaks inside a paragraph's line)."""
    if shutil.which("man", path=CLEAN_PATH) is None:
        raise AssertionError("no man: scripts/install-test-deps installs man-db")
    command = ["man", "-E", "ascii", "-l", path]
    if warnings:
        # What lintian runs (its check documentation/manual).
        command = ["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", path]
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={"PATH": CLEAN_PATH, "LC_ALL": "C.UTF-8", "MANWIDTH": "250",
                                 "MANROFFSEQ": ""})
    return result


def console_scripts():
    """{name: module} of setup.py's console scripts (read as text: importing runs setup())."""
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as file:
        text = file.read()
    block = re.search(r'"console_scripts"\s*:\s*\[(.*?)\]', text, re.S).group(1)
    return dict(re.findall(r'"([\w-]+)\s*=\s*([\w.]+):\w+"', block))


def argparse_parser(module):
    """The argparse parser of a command's module (its build_parser())."""
    parser = module.build_parser()
    assert isinstance(parser, argparse.ArgumentParser), parser
    return parser


def option_names(parser_or_options):
    """Every option a user may type, as spelled on the command line; hidden aliases left out."""
    if isinstance(parser_or_options, argparse.ArgumentParser):
        names = []
        for action in parser_or_options._actions:
            if action.help == argparse.SUPPRESS:
                continue
            names.extend(action.option_strings or [action.metavar or action.dest])
        return names
    return [f"-{name}" if len(name) == 1 else f"--{name}"
            for name in parser_or_options.synonyms]


def mentions(text, option):
    """Whether option stands in text as a word of its own (--log is not --log-level)."""
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


class PageListTests(SynchronousTestCase):
    """Which pages there are."""

    def test_every_console_script_has_a_page(self):
        """Each console script of setup.py gets NAME.1; the manager and its file theirs."""
        scripts = console_scripts()
        self.assertIn("milter-manager-greylist", scripts)
        self.assertEqual(sorted(pages()),
                         sorted([f"{name}.1" for name in scripts]
                                + ["milter-manager.8", "milter-manager.conf.5"]))

    def test_console_script_without_page_fails(self):
        """A console script added to setup.py without a page in man/pages.toml stops the build."""
        work = self.mktemp()
        os.makedirs(work)
        setup = os.path.join(work, "setup.py")
        with open(setup, "w", encoding="utf-8") as file:
            file.write('setup(entry_points={"console_scripts": [\n'
                       '    "milter-test-server = miltermanager.tools.test_server:main",\n'
                       '    "milter-manager-frobnicate = miltermanager.frobnicate:main",\n'
                       ']})\n')
        status, output = make_pages("--setup", setup, os.path.join(work, "out"))
        self.assertEqual(status, 1)
        self.assertIn("no page in", output)
        self.assertIn("milter-manager-frobnicate", output)
        self.assertNotIn("Traceback", output)

    def test_option_without_help_fails(self):
        """An option without a help text stops the build, naming the page and the option."""
        work = self.mktemp()
        os.makedirs(work)
        setup = os.path.join(work, "setup.py")
        with open(setup, "w", encoding="utf-8") as file:
            file.write('setup(entry_points={"console_scripts": ['
                       '"undocumented = tests.test_manpages:main"]})\n')
        toml = os.path.join(work, "pages.toml")
        with open(toml, "w", encoding="utf-8") as file:
            file.write('[[page]]\nname = "undocumented"\nsection = 1\nconsole_script = true\n'
                       'summary = "a test"\nparser = "tests.test_manpages:undocumented_parser"\n'
                       'description = "A test."\n')
        status, output = make_pages("--setup", setup, "--pages", toml, os.path.join(work, "out"))
        self.assertEqual(status, 1, output)
        self.assertEqual(output.strip(), r"make-manpages: undocumented(1): \fB\-\-frobs\fR "
                                         r"\fIFROBS\fR has no help text")


def undocumented_parser():
    """A parser with an option nobody wrote help for (test_option_without_help_fails)."""
    parser = argparse.ArgumentParser(prog="undocumented")
    parser.add_argument("--frobs")
    return parser


class OptionTests(SynchronousTestCase):
    """Every option of each command's own parser is on its page."""

    def assert_documented(self, page, parser_or_options):
        result = render(pages()[page])
        self.assertEqual(result.returncode, 0, result.stderr)
        options = option_names(parser_or_options)
        self.assertGreater(len(options), 2)
        missing = [option for option in options if not mentions(result.stdout, option)]
        self.assertEqual(missing, [], f"{page} lacks options")
        return result.stdout

    def test_manager(self):
        """milter-manager(8) has every option of `twistd3 milter-manager`, the plugin's Options."""
        from miltermanager import tap

        text = self.assert_documented("milter-manager.8", tap.Options())
        self.assertIn("twistd3 [twistd options] milter-manager [options]", text)
        self.assertTrue(mentions(text, "--check-config"))

    def test_test_server(self):
        """milter-test-server(1) has every option of its argparse parser."""
        from miltermanager.tools import test_server

        self.assertEqual(console_scripts()["milter-test-server"], test_server.__name__)
        text = self.assert_documented("milter-test-server.1", argparse_parser(test_server))
        self.assertIn("Load generation", text)

    def test_test_client(self):
        """milter-test-client(1) has every option of its usage.Options, opt_ methods included."""
        from miltermanager.tools import test_client

        self.assertEqual(console_scripts()["milter-test-client"], test_client.__name__)
        text = self.assert_documented("milter-test-client.1", test_client.Options())
        self.assertIn("--action=STATUS[@STAGE]", text)

    def test_import_config(self):
        """milter-manager-import-config(1) has its options and its PATH argument."""
        from miltermanager.tools import import_config

        self.assertEqual(console_scripts()["milter-manager-import-config"], import_config.__name__)
        text = self.assert_documented("milter-manager-import-config.1",
                                      argparse_parser(import_config))
        self.assertIn("milter-manager-import-config [options] PATH", text)

    def test_greylist(self):
        """milter-manager-greylist(1) has every option, with the defaults the program uses."""
        from miltermanager.greylist import main

        self.assertEqual(console_scripts()["milter-manager-greylist"], main.__name__)
        text = self.assert_documented("milter-manager-greylist.1", main.Options())
        self.assertIn("Default: /var/lib/milter-manager/greylist.sqlite3.", text)

    def test_detect(self):
        """milter-manager-detect(1), once setup.py installs the command, has every option."""
        if "milter-manager-detect" not in console_scripts():
            self.assertNotIn("milter-manager-detect.1", pages())
            return
        from miltermanager.detect import main

        self.assertEqual(console_scripts()["milter-manager-detect"], main.__name__)
        self.assert_documented("milter-manager-detect.1", argparse_parser(main))

    def test_every_setting(self):
        """milter-manager.conf(5) lists every setting of every section and of define_milter."""
        result = render(pages()["milter-manager.conf.5"])
        sections = [model.ManagerConfig(), model.SecurityConfig(), model.LogConfig(),
                    model.PackageConfig(), model.ControllerConfig(), model.MilterConfig("x")]
        names = [f"{getattr(section, 'SECTION', 'milter')}.{name}"
                 for section in sections for name in model.settings_of(section)]
        self.assertIn("manager.connection_spec", names)
        self.assertEqual([name for name in names if not mentions(result.stdout, name)], [])
        self.assertIn('manager.connection_spec = "inet:10025@[127.0.0.1]"', result.stdout)


class FormatTests(SynchronousTestCase):
    """The pages are well-formed roff."""

    def test_no_warnings(self):
        """man --warnings (groff's own checks, as lintian runs them) says nothing on any page."""
        for name, path in sorted(pages().items()):
            result = render(path, warnings=True)
            self.assertEqual((name, result.returncode, result.stderr), (name, 0, ""))

    def test_header(self):
        """.TH names the page, its section and the version; the date is SOURCE_DATE_EPOCH's."""
        import miltermanager

        with open(pages()["milter-manager.conf.5"], encoding="utf-8") as file:
            first = file.readline().strip()
        self.assertEqual(first, rf'.TH MILTER\-MANAGER.CONF 5 "2026-12-03" '
                                f'"milter-manager {miltermanager.__version__}" "milter-manager"')
