"""Tests for milter-manager-import-config: upstream's Ruby configuration into our language."""

import io
import os
import shutil
import subprocess
import sys
import textwrap

from twisted.trial.unittest import SynchronousTestCase

from miltermanager import config
from miltermanager.config import model
from miltermanager.merge import Status
from miltermanager.tools import import_config

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "upstream")
DEBIAN = os.path.join(FIXTURES, "debian")
SIMPLE = os.path.join(FIXTURES, "simple")
# This checkout's configuration directory: its applicable-conditions/ holds the built-ins.
SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc")
TODO = "# TODO(milter-manager-import-config):"
HEADER = "# Translated from Ruby by milter-manager-import-config.\n"


class ImportTestCase(SynchronousTestCase):
    def setUp(self):
        self.output = os.path.abspath(self.mktemp())

    def run_tool(self, path, *options):
        """Run the command in-process; return (exit status, stdout lines, stderr text)."""
        stdout, stderr = io.StringIO(), io.StringIO()
        argv = [path, "-o", self.output, *options]
        try:
            code = import_config.run(argv, stdout=stdout, stderr=stderr)
        except SystemExit as exit:
            code = exit.code
        return code, stdout.getvalue().splitlines(), stderr.getvalue()

    def written(self, name):
        with open(os.path.join(self.output, name), encoding="utf-8") as file:
            return file.read()

    def source(self, text, name="milter-manager.conf", directory=None):
        """Write a Ruby file (dedented) into a source directory; return its path."""
        directory = directory or os.path.abspath(self.mktemp())
        path = os.path.join(directory, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as file:
            file.write(textwrap.dedent(text))
        return path

    def translate(self, ruby, *options):
        """Translate one Ruby file; return (exit status, stdout lines, the Python written)."""
        code, lines, _ = self.run_tool(self.source(ruby), *options)
        return code, lines, self.written("milter-manager.conf")

    def load(self, name="milter-manager.conf"):
        """Load the output as installed: beside the shipped applicable-conditions files."""
        self.install_builtins()
        return config.load(os.path.join(self.output, name), load_paths=[SHIPPED],
                           strict=False, detect_root=self.mktemp())  # no milter detected

    def install_builtins(self):
        """Copy the shipped condition files into the output, as the package installs them."""
        shipped = os.path.join(SHIPPED, "applicable-conditions")
        target = os.path.join(self.output, "applicable-conditions")
        os.makedirs(target, exist_ok=True)
        for name in import_config.BUILTIN_CONDITION_FILES:
            shutil.copyfile(os.path.join(shipped, name), os.path.join(target, name))


class DebianTreeTests(ImportTestCase):
    """The Debian-like tree: a main file, a local file and two condition files."""

    def setUp(self):
        super().setUp()
        self.code, self.summary, self.errors = self.run_tool(
            os.path.join(DEBIAN, "milter-manager.conf"))

    def test_main_file(self):
        """The three standard lines become calls; the commented defaults stay as written."""
        with open(os.path.join(DEBIAN, "milter-manager.conf"), encoding="utf-8") as file:
            ruby_comments = file.read().split("\n\n", 2)[2]
        self.assertEqual(self.written("milter-manager.conf"), (
            "# -*- python -*-\n" + HEADER + "\n"
            'load("applicable-conditions/*.conf")\n'
            "load_default()\n"
            'load_if_exist("milter-manager.local.conf")\n'
            "\n" + ruby_comments))

    def test_local_file(self):
        """Every setting, milter item, block form and value kind: exact output and TODOs."""
        self.assertEqual(self.written("milter-manager.local.conf"), "# -*- python -*-\n" + HEADER
                         + r'''# mail.example.com: local settings, kept when the package is upgraded.

security.effective_user = "milter-manager"
security.effective_group = "milter-manager"

log.level = "all"            # everything, while we migrate
log.use_syslog = False
log.syslog_facility = "local4"
log.path = None

manager.connection_spec = "unix:/var/spool/postfix/milter-manager/milter-manager.sock"
manager.unix_socket_mode = 0o660
manager.unix_socket_group = "postfix"
manager.remove_unix_socket_on_create = True
manager.fallback_status = "temporary_failure"  # a symbol, as upstream allows
manager.chunk_size = 65_535

with define_milter("opendkim") as milter:
    milter.description = "DKIM for \"example.com\"\tand Tom's lists, café #1"
    milter.connection_spec = "inet:8891@[127.0.0.1]"
    milter.enabled = True
    milter.fallback_status = "accept"
    milter.evaluation_mode = False
    milter.applicable_conditions = ["Remote Network", "Unauthenticated"]
    milter.connection_timeout = 297.0
    milter.writing_timeout = 15
    milter.reading_timeout = 15
    milter.end_of_message_timeout = 60
    milter.command = "/etc/init.d/opendkim"
    milter.command_options = ["start"]
    milter.user_name = "opendkim"

with define_milter("clamav-milter") as m:  # antivirus
    m.connection_spec = "unix:/var/run/clamav/clamav-milter.ctl"
    m.fallback_status = "temporary-failure"
    m.add_applicable_condition("S25R")
    m.add_applicable_condition("No Stress")
    m.reading_timeout = 1.5e1
    # m.evaluation_mode = true

with define_milter("spamass-milter") as milter:
    milter.connection_spec = "unix:/var/run/spamass/spamass.sock"
    milter.evaluation_mode = True

with define_milter("milter-greylist") as milter:
    milter.connection_spec = "inet:3333@localhost"
    milter.applicable_conditions = ["S25R"]
    milter.add_applicable_condition("Internal Only")
    # TODO(milter-manager-import-config): milter-manager.local.conf:50: our configuration language has no milter.target_hosts
    #   milter.target_hosts << "external.example.com"

remove_milter("milter@10026")

# Every child waits longer for its end-of-message reply.
for name in defined_milters:
    with define_milter(name) as milter:
        milter.end_of_message_timeout = 120.0

# TODO(milter-manager-import-config): milter-manager.local.conf:62: `if` is Ruby logic: rewrite it in Python
#   if File.exist?("/etc/milter-manager/staging")
#     manager.connection_spec = "inet:10026@[127.0.0.1]"
#   end

# TODO(milter-manager-import-config): milter-manager.local.conf:66: `milter_name` is a Ruby variable: write its value where it is used
#   milter_name = "opendkim"
# TODO(milter-manager-import-config): milter-manager.local.conf:67: the regular expression /\.example\.net\z/ is Ruby; Python's re differs (\A, \z, flags): rewrite it
#   s25r.add_whitelist(/\.example\.net\z/)
''')

    def test_condition_file(self):
        """A condition's description translates; its stopper is a TODO with a Python skeleton."""
        self.assertEqual(self.written("applicable-conditions/internal-only.conf"),
                         "# -*- python -*-\n" + HEADER + r'''
with define_applicable_condition("Internal Only") as condition:
    condition.description = "Apply only to mail for our own domain"

    # TODO(milter-manager-import-config): applicable-conditions/internal-only.conf:6: a stopper is Ruby code: rewrite it in Python, starting from
    #     @condition.define_envelope_recipient_stopper
    #     def envelope_recipient_stopper(context, recipient):
    #         return ...  # True stops the child milter
    # Ruby:
    #   condition.define_envelope_recipient_stopper do |context, recipient|
    #     not /@example\.com>\z/i =~ recipient
    #   end
''')

    def test_builtin_condition_file_skipped(self):
        """Upstream's own condition files (s25r.conf) are named in the summary, not written."""
        self.assertFalse(os.path.exists(
            os.path.join(self.output, "applicable-conditions", "s25r.conf")))
        self.assertIn("skipped applicable-conditions/s25r.conf: upstream's built-in applicable "
                      "conditions, not translated: milter-manager ships its own", self.summary)

    def test_summary_and_exit_status(self):
        """Exit 2; the summary lists each file, then each item needing attention with FILE:LINE."""
        self.assertEqual(self.code, 2)
        self.assertEqual(self.errors, "")
        out = self.output
        self.assertEqual(self.summary, [
            f"wrote {out}/milter-manager.conf: 3 items translated",
            f"wrote {out}/applicable-conditions/internal-only.conf: 2 items translated, "
            "1 needs attention",
            f"wrote {out}/milter-manager.local.conf: 43 items translated, 4 need attention",
            "skipped applicable-conditions/s25r.conf: upstream's built-in applicable conditions, "
            "not translated: milter-manager ships its own",
            "needs attention:",
            "  applicable-conditions/internal-only.conf:6: a stopper is Ruby code: rewrite it in "
            "Python, starting from",
            "  milter-manager.local.conf:50: our configuration language has no "
            "milter.target_hosts",
            "  milter-manager.local.conf:62: `if` is Ruby logic: rewrite it in Python",
            "  milter-manager.local.conf:66: `milter_name` is a Ruby variable: write its value "
            "where it is used",
            "  milter-manager.local.conf:67: the regular expression /\\.example\\.net\\z/ is "
            "Ruby; Python's re differs (\\A, \\z, flags): rewrite it",
            "3 files written, 48 items translated, 5 need attention",
        ])

    def test_loaded_values(self):
        """The output loads, and every value is what the Ruby meant."""
        configuration = self.load()
        security, log, manager = configuration.security, configuration.log, configuration.manager
        self.assertEqual((security.effective_user, security.effective_group),
                         ("milter-manager", "milter-manager"))
        self.assertEqual((log.level, log.use_syslog, log.syslog_facility, log.path),
                         ("all", False, "local4", None))
        self.assertEqual(manager.connection_spec,
                         "unix:/var/spool/postfix/milter-manager/milter-manager.sock")
        self.assertEqual(manager.unix_socket_mode, 0o660)
        self.assertEqual(manager.unix_socket_group, "postfix")
        self.assertIs(manager.fallback_status, Status.TEMPORARY_FAILURE)
        self.assertEqual(manager.chunk_size, 65535)
        # Defined in this order; the each loop redefines them all, which keeps it.
        self.assertEqual([milter.name for milter in configuration.milters],
                         ["opendkim", "clamav-milter", "spamass-milter", "milter-greylist"])
        opendkim = configuration.milter("opendkim")
        self.assertEqual(opendkim.description,
                         "DKIM for \"example.com\"\tand Tom's lists, caf\u00e9 #1")
        self.assertEqual(opendkim.connection_spec, "inet:8891@[127.0.0.1]")
        self.assertIs(opendkim.fallback_status, Status.ACCEPT)
        self.assertEqual((opendkim.connection_timeout, opendkim.writing_timeout,
                          opendkim.reading_timeout), (297.0, 15.0, 15.0))
        self.assertEqual((opendkim.command, opendkim.command_options, opendkim.user_name),
                         ("/etc/init.d/opendkim", "start", "opendkim"))
        self.assertEqual(opendkim.applicable_conditions, ["Remote Network", "Unauthenticated"])
        clamav = configuration.milter("clamav-milter")
        self.assertIs(clamav.fallback_status, Status.TEMPORARY_FAILURE)
        self.assertEqual(clamav.reading_timeout, 15.0)
        self.assertEqual(clamav.applicable_conditions, ["S25R", "No Stress"])
        self.assertIs(configuration.milter("spamass-milter").evaluation_mode, True)
        greylist = configuration.milter("milter-greylist")
        self.assertEqual(greylist.applicable_conditions, ["S25R", "Internal Only"])
        self.assertEqual({milter.end_of_message_timeout for milter in configuration.milters},
                         {120.0})
        self.assertEqual(configuration.conditions["Internal Only"].description,
                         "Apply only to mail for our own domain")

    def test_each_file_loads(self):
        """Each file loads: the condition file alone, the local file after it, as main loads them."""
        config.load(os.path.join(self.output, "applicable-conditions", "internal-only.conf"),
                    strict=False)
        loader = config.Loader(strict=False)
        for name in import_config.BUILTIN_CONDITION_FILES:
            loader.load_file(os.path.join(SHIPPED, "applicable-conditions", name))
        for name in ("applicable-conditions/internal-only.conf", "milter-manager.local.conf"):
            loader.load_file(os.path.join(self.output, name))
        self.assertEqual(len(loader.finish().milters), 4)

    def test_loads_where_installed_only(self):
        """The output's own applicable-conditions/ hides the package's from its glob until
        installed beside them; the check after writing loads it as installed, so passes."""
        with self.assertRaises(config.ConfigurationError) as caught:
            config.load(os.path.join(self.output, "milter-manager.conf"), load_paths=[SHIPPED],
                        strict=False)
        self.assertIn("no condition 'S25R'", str(caught.exception))
        self.assertNotIn("does not load", "\n".join(self.summary))


class SimpleTests(ImportTestCase):
    def test_everything_translated(self):
        """A file with nothing to look at: exit 0, one summary line per file, no TODO."""
        code, summary, errors = self.run_tool(os.path.join(SIMPLE, "milter-manager.conf"))
        self.assertEqual((code, errors), (0, ""))
        self.assertEqual(summary, [
            f"wrote {self.output}/milter-manager.conf: 8 items translated",
            "1 file written, 8 items translated, 0 need attention",
        ])
        self.assertEqual(self.written("milter-manager.conf"), "# -*- python -*-\n" + HEADER + '''
load_default()
load_if_exist("milter-manager.local.conf")

manager.connection_spec = "inet:10025@[127.0.0.1]"
manager.fallback_status = "reject"
security.effective_user = "milter-manager"

with define_milter("clamav") as milter:
    milter.connection_spec = "inet:3310@[127.0.0.1]"
    milter.fallback_status = "temporary_failure"
''')
        milter = self.load().milter("clamav")
        self.assertIs(milter.fallback_status, Status.TEMPORARY_FAILURE)

    def test_console_script(self):
        """The installed milter-manager-import-config script runs and exits 0."""
        script = shutil.which("milter-manager-import-config")
        if script is None:
            self.fail("pip install -e . first: the console script is not installed")
        process = subprocess.run(
            [script, os.path.join(SIMPLE, "milter-manager.conf"), "-o", self.output],
            capture_output=True, text=True, timeout=60)
        self.assertEqual(process.returncode, 0, process.stderr)
        self.assertEqual(process.stdout.splitlines()[-1],
                         "1 file written, 8 items translated, 0 need attention")

    def test_module_runs(self):
        """python -m miltermanager.tools.import_config is the same command."""
        process = subprocess.run(
            [sys.executable, "-m", "miltermanager.tools.import_config",
             os.path.join(DEBIAN, "milter-manager.conf"), "-o", self.output],
            capture_output=True, text=True, timeout=60)
        self.assertEqual(process.returncode, 2, process.stderr)


class ValueTests(ImportTestCase):
    def test_literals(self):
        """Ruby literals become Python ones: escapes, symbols, %w, octal, floats, nil, -N."""
        code, _, python = self.translate(r'''
            manager.connection_spec = 'inet:10025@[127.0.0.1]'
            manager.unix_socket_mode = 0600
            manager.unix_socket_group = :mail
            manager.pid_file = nil
            manager.daemon = false
            controller.unix_socket_mode = 0o640
            manager.max_connections = 1_000
            manager.connection_check_interval = 2.5
            define_milter("a") do |milter|
              milter.connection_spec = :"inet:1@[127.0.0.1]"
              milter.description = "tab\t quote\" backslash\\ \e\x41\101 \u00e9\u{1F600} \#{no}"
              milter.command_options = %w[-p inet:1@localhost]
              milter.command = 'it\'s \n raw'
              milter.user_name = %q(with (nested) parentheses)
            end
            ''')
        self.assertEqual(code, 0)
        self.assertEqual(python, HEADER + r'''
manager.connection_spec = "inet:10025@[127.0.0.1]"
manager.unix_socket_mode = 0o600
manager.unix_socket_group = "mail"
manager.pid_file = None
manager.daemon = False
controller.unix_socket_mode = 0o640
manager.max_connections = 1_000
manager.connection_check_interval = 2.5
with define_milter("a") as milter:
    milter.connection_spec = "inet:1@[127.0.0.1]"
    milter.description = "tab\t quote\" backslash\\ \x1bAA é😀 #{no}"
    milter.command_options = ["-p", "inet:1@localhost"]
    milter.command = "it's \\n raw"
    milter.user_name = "with (nested) parentheses"
''')
        configuration = self.load()
        self.assertEqual(configuration.manager.unix_socket_mode, 0o600)
        self.assertEqual(configuration.controller.unix_socket_mode, 0o640)
        self.assertEqual(configuration.milter("a").description,
                         "tab\t quote\" backslash\\ \x1bAA \u00e9\U0001F600 #{no}")
        self.assertEqual(configuration.milter("a").command, "it's \\n raw")

    def test_multiline_array(self):
        """An array over several lines becomes one line; its comments go before it."""
        _, _, python = self.translate('''
            define_milter("a") do |milter|
              milter.connection_spec = "inet:1@[127.0.0.1]"
              milter.command_options = [
                "-p",                  # the socket
                "inet:1@[127.0.0.1]",
              ]
            end
            ''')
        self.assertIn('''    # the socket
    milter.command_options = ["-p", "inet:1@[127.0.0.1]"]
''', python)

    def test_trailing_comments_keep_their_column(self):
        """A comment at the end of a line stays at its column when the code fits, else 2 spaces."""
        _, _, python = self.translate('''
            log.level = "all"        # aligned
            log.path = nil           # nil is longer as None
            log.use_syslog = true # one space
            ''')
        self.assertEqual(python, HEADER + '''
log.level = "all"        # aligned
log.path = None          # nil is longer as None
log.use_syslog = True  # one space
''')


class BlockTests(ImportTestCase):
    def test_block_forms(self):
        """do |x| ... end, { |x| ... } on one or more lines, any variable name, no parentheses."""
        code, _, python = self.translate('''
            define_milter("a") do |egg|
              egg.connection_spec = "inet:1@[127.0.0.1]"
            end
            define_milter "b" do |milter| milter.connection_spec = "inet:2@[127.0.0.1]" end
            define_milter("c") { |m| m.connection_spec = "inet:3@[127.0.0.1]"; m.enabled = false }
            define_milter("d") {
              |pass| pass.connection_spec = "inet:4@[127.0.0.1]"
            }
            define_milter("a") do |milter|
            end
            ''')
        self.assertEqual(code, 0)
        self.assertEqual(python, HEADER + '''
with define_milter("a") as egg:
    egg.connection_spec = "inet:1@[127.0.0.1]"
with define_milter("b") as milter:
    milter.connection_spec = "inet:2@[127.0.0.1]"
with define_milter("c") as m:
    m.connection_spec = "inet:3@[127.0.0.1]"
    m.enabled = False
with define_milter("d") as milter:
    milter.connection_spec = "inet:4@[127.0.0.1]"
with define_milter("a") as milter:
    pass
''')

    def test_defined_milters_each(self):
        """defined_milters.each with define_milter(name) or remove_milter(name) becomes a for loop."""
        code, _, python = self.translate('''
            define_milter("a") { |milter| milter.connection_spec = "inet:1@[127.0.0.1]" }
            define_milter("b") { |milter| milter.connection_spec = "inet:2@[127.0.0.1]" }
            define_milter("c") { |milter| milter.connection_spec = "inet:3@[127.0.0.1]" }
            remove_milter("c")
            defined_milters.each do |name|
              define_milter(name) do |milter|   # all of them
                milter.enabled = false
              end
            end
            defined_milters.each { |name| remove_milter(name) }
            define_milter("d") { |milter| milter.connection_spec = "inet:4@[127.0.0.1]" }
            ''')
        self.assertEqual(code, 0)
        self.assertIn('''remove_milter("c")
for name in defined_milters:
    with define_milter(name) as milter:  # all of them
        milter.enabled = False
for name in defined_milters:
    remove_milter(name)
''', python)
        self.assertEqual([milter.name for milter in self.load().milters], ["d"])

    def test_condition_defined_after_its_milter(self):
        """A milter may name a condition defined later in the files: the name is kept."""
        code, _, python = self.translate('''
            define_milter("a") do |milter|
              milter.connection_spec = "inet:1@[127.0.0.1]"
              milter.applicable_conditions = ["Mine", "Nowhere"]
            end
            define_applicable_condition("Mine") do |condition|
              condition.description = "ours"
            end
            ''')
        self.assertEqual(code, 2)
        self.assertIn('''    # TODO(milter-manager-import-config): milter-manager.conf:4: applicable condition left out ("Nowhere": not defined by the translated files): the milter runs without it
    #   milter.applicable_conditions = ["Mine", "Nowhere"]
    milter.applicable_conditions = ["Mine"]
''', python)
        self.assertEqual(self.load().milter("a").applicable_conditions, ["Mine"])

    def test_hooks(self):
        """Blocks given to the language's verbs become TODOs with a decorator skeleton."""
        code, summary, python = self.translate('''
            manager.maintained do
              GC.start
            end
            manager.define_connection_checker("alive") do |context|
              true
            end
            ''')
        self.assertEqual(code, 2)
        self.assertEqual(python, HEADER + f'''
{TODO} milter-manager.conf:2: the block given to manager.maintained is Ruby code: rewrite it in Python, starting from
#     @manager.maintained
#     def maintained():
#         ...
# Ruby:
#   manager.maintained do
#     GC.start
#   end
{TODO} milter-manager.conf:5: the block given to manager.define_connection_checker is Ruby code: rewrite it in Python, starting from
#     @manager.define_connection_checker("alive")
#     def connection_checker(context):
#         ...
# Ruby:
#   manager.define_connection_checker("alive") do |context|
#     true
#   end
''')

    def test_stopper_arguments_are_ours(self):
        """A stopper skeleton takes our arguments, not the Ruby block's (`from` is a keyword)."""
        _, _, python = self.translate('''
            define_applicable_condition("Auth") do |condition|
              condition.define_envelope_from_stopper do |context, from, parameters|
                not context.authenticated?
              end
            end
            ''')
        arguments = ", ".join(model.STOPPERS["envelope_from"])
        self.assertIn(f"#     def envelope_from_stopper({arguments}):\n", python)


class LoadTests(ImportTestCase):
    def test_loaded_files_are_translated(self):
        """load globs and load_if_exist are followed; nested files keep their relative names."""
        directory = os.path.abspath(self.mktemp())
        main = self.source('''
            load("conf.d/*.conf")
            load_if_exist("absent.conf")
            ''', directory=directory)
        self.source('load("common.conf")\n', "conf.d/a.conf", directory)
        self.source('manager.chunk_size = 4096\n', "common.conf", directory)
        code, summary, _ = self.run_tool(main)
        self.assertEqual(code, 0)
        self.assertEqual(summary[:3], [
            f"wrote {self.output}/milter-manager.conf: 2 items translated",
            f"wrote {self.output}/conf.d/a.conf: 1 item translated",
            f"wrote {self.output}/common.conf: 1 item translated",
        ])
        # Upstream resolves load() against the configuration directory; ours
        # first against the including file's.
        self.assertEqual(self.written("conf.d/a.conf"), HEADER + 'load("../common.conf")\n')
        self.assertEqual(self.load().manager.chunk_size, 4096)

    def test_unusable_loads(self):
        """A missing file for load, or a file outside the directory, needs attention."""
        code, _, python = self.translate('''
            load("missing.conf")
            load("/etc/hostname")
            load_if_exist("missing.conf")
            ''')
        self.assertEqual(code, 2)
        directory = os.path.dirname(self.output)
        self.assertIn(f"{TODO} milter-manager.conf:2: missing.conf does not exist\n", python)
        self.assertIn(f"{TODO} milter-manager.conf:3: /etc/hostname is outside ", python)
        self.assertTrue(python.endswith('load_if_exist("missing.conf")\n'), directory)


class AttentionTests(ImportTestCase):
    """Ruby that is not translated: a TODO naming FILE:LINE and why, the Ruby kept below it."""

    CASES = [
        ('if x\n  log.level = "all"\nend', "`if` is Ruby logic: rewrite it in Python"),
        ('unless x\n  log.level = "all"\nend', "`unless` is Ruby logic: rewrite it in Python"),
        ("case x\nwhen 1 then y\nend", "`case` is Ruby logic: rewrite it in Python"),
        ('log.level = "all" if ENV["DEBUG"]', "`if` is Ruby logic: rewrite it in Python"),
        ('manager.connection_spec = ENV["SPEC"]',
         "`ENV` is a Ruby class or constant: rewrite it in Python"),
        ('manager.pid_file = "/run/#{name}.pid"',
         'the string "/run/#{name}.pid" interpolates Ruby code (#{...})'),
        ("manager.max_connections = 5 * 60",
         "`*` makes an expression; only literal values are translated"),
        ('require "socket"', "`require` is not part of the configuration language"),
        ('spec = "inet:1"', "`spec` is a Ruby variable: write its value where it is used"),
        ('manager.fallback_status = "tempfail"',
         "manager.fallback_status must be one of accept, temporary-failure, reject, discard; "
         "got 'tempfail'"),
        ("manager.no_such_thing = 1", "our configuration language has no manager.no_such_thing"),
        ('database.type = "mysql2"', f"database.type: {model.REFUSED['database']}"),
        ("database.setup", f"database.setup: {model.REFUSED['database']}"),
        ("log.level = /all/", "the regular expression /all/ is Ruby; Python's re differs "
                              "(\\A, \\z, flags): rewrite it"),
        ("end", "`end` closes nothing"),
        ("define_milter(\"a\") do |milter|", "the file ends before this Ruby construct does"),
    ]

    def test_cases(self):
        """Each kind of untranslated Ruby has its reason; all of it is kept, commented."""
        for ruby, reason in self.CASES:
            self.output = os.path.abspath(self.mktemp())
            code, summary, python = self.translate(ruby + "\n")
            self.assertEqual(code, 2, ruby)
            commented = "".join(f"#   {line}\n" for line in ruby.split("\n"))
            self.assertEqual(python, f"{HEADER}{TODO} milter-manager.conf:1: {reason}\n"
                             f"{commented}", ruby)
            self.assertEqual(summary[-2:], [
                f"  milter-manager.conf:1: {reason}",
                "1 file written, 0 items translated, 1 needs attention"], ruby)
            config.load(os.path.join(self.output, "milter-manager.conf"), strict=False)

    def test_todo_inside_a_block(self):
        """A TODO inside define_milter is indented there; a body of TODOs only gets `pass`."""
        _, _, python = self.translate('''
            define_milter("a") do |milter|
              milter.enabled = false if ENV["OFF"]
            end
            ''')
        self.assertEqual(python, HEADER + f'''
with define_milter("a") as milter:
    {TODO} milter-manager.conf:3: `if` is Ruby logic: rewrite it in Python
    #   milter.enabled = false if ENV["OFF"]
    pass
''')

    def test_output_that_does_not_load(self):
        """A milter upstream detected, only changed here, lacks its socket: reported, exit 2."""
        code, summary, _ = self.translate('''
            define_milter("clamav-milter") do |milter|
              milter.fallback_status = "reject"
            end
            ''')
        self.assertEqual(code, 2)
        # The line is the output's: the Ruby file's line 2 is its line 3.
        self.assertEqual(summary[-2:], [
            f'  {self.output}/milter-manager.conf:3: the translated configuration does not '
            'load: milter '
            '"clamav-milter": connection_spec is required (where the child milter listens, '
            'e.g. "inet:8891@[127.0.0.1]"); upstream may have found this milter by detection '
            "(load_default): give it milter.connection_spec",
            "1 file written, 2 items translated, 1 needs attention"])


class BuiltinConditionTests(ImportTestCase):
    """milter-manager's built-in conditions, defined by its applicable-conditions files."""

    WITH_LOAD = '''
        load("applicable-conditions/*.conf")
        define_milter("a") do |milter|
          milter.connection_spec = "inet:1@[127.0.0.1]"
          milter.applicable_conditions = ["S25R", "Not DNSBL Listed"]
          milter.add_applicable_condition "Trust"
        end
        '''

    def test_table_matches_the_shipped_files(self):
        """BUILTIN_CONDITION_FILES names each shipped file and the conditions it defines."""
        directory = os.path.join(SHIPPED, "applicable-conditions")
        shipped = sorted(name for name in os.listdir(directory) if name.endswith(".conf"))
        self.assertEqual(sorted(import_config.BUILTIN_CONDITION_FILES), shipped)
        for name, conditions in import_config.BUILTIN_CONDITION_FILES.items():
            loader = config.Loader(strict=False)
            loader.load_file(os.path.join(directory, name))
            self.assertEqual(tuple(loader.finish().conditions), conditions, name)

    def test_kept_when_loaded(self):
        """With load("applicable-conditions/*.conf") the names stay: no TODO, exit 0."""
        code, summary, python = self.translate(self.WITH_LOAD)
        self.assertEqual(code, 0, summary)
        self.assertEqual(python, HEADER + '''
load("applicable-conditions/*.conf")
with define_milter("a") as milter:
    milter.connection_spec = "inet:1@[127.0.0.1]"
    milter.applicable_conditions = ["S25R", "Not DNSBL Listed"]
    milter.add_applicable_condition("Trust")
''')
        self.assertEqual(self.load().milter("a").applicable_conditions,
                         ["S25R", "Not DNSBL Listed", "Trust"])

    def test_kept_when_loaded_one_by_one(self):
        """A load naming one shipped file (or the directory) keeps that file's conditions only."""
        directory = os.path.abspath(self.mktemp())
        self.source("# upstream's\n", "applicable-conditions/s25r.conf", directory)
        main = self.source('''
            load "applicable-conditions/s25r.conf"
            define_milter("a") do |milter|
              milter.connection_spec = "inet:1@[127.0.0.1]"
              milter.applicable_conditions = ["S25R", "Trust"]
            end
            ''', directory=directory)
        code, summary, _ = self.run_tool(main)
        self.assertEqual(code, 2)
        self.assertIn('milter-manager.conf:5: applicable condition left out ("Trust": '
                      "milter-manager's built-in, but the translated files do not "
                      'load("applicable-conditions/*.conf"), which defines it): the milter runs '
                      "without it", "\n".join(summary))
        self.assertIn('    milter.applicable_conditions = ["S25R"]\n',
                      self.written("milter-manager.conf"))

    def test_left_out_without_the_load(self):
        """Without a load of the shipped files, a built-in name is left out, saying so."""
        code, _, python = self.translate('''
            define_milter("a") do |milter|
              milter.connection_spec = "inet:1@[127.0.0.1]"
              milter.applicable_conditions = ["S25R", "No Stress"]
            end
            ''')
        self.assertEqual(code, 2)
        self.assertIn(f'''    {TODO} milter-manager.conf:4: applicable conditions left out ("S25R", "No Stress": milter-manager's built-in, but the translated files do not load("applicable-conditions/*.conf"), which defines them): the milter runs without them
    #   milter.applicable_conditions = ["S25R", "No Stress"]
    milter.applicable_conditions = []
''', python)

    LOCAL = '''
        define_milter("spamass-milter") do |milter|
          milter.connection_spec = "unix:/run/spamass.sock"
          milter.applicable_conditions = ["Remote Network", "Unauthenticated", "Nope"]
        end
        '''

    def test_kept_in_the_local_file(self):
        """milter-manager.local.conf keeps built-in names: the shipped main file loads them first."""
        code, summary, _ = self.run_tool(self.source(self.LOCAL, "milter-manager.local.conf"))
        self.assertEqual(code, 2, summary)
        python = self.written("milter-manager.local.conf")
        self.assertIn('    milter.applicable_conditions = ["Remote Network", "Unauthenticated"]\n',
                      python)
        self.assertIn('left out ("Nope": not defined by the translated files)', python)
        # Loaded as the shipped main file loads it, the conditions are the built-in ones.
        self.install_builtins()
        with open(os.path.join(self.output, "milter-manager.conf"), "w") as main:
            main.write('load("applicable-conditions/*.conf")\nload("milter-manager.local.conf")\n')
        self.assertEqual(self.load().milter("spamass-milter").applicable_conditions,
                         ["Remote Network", "Unauthenticated"])

    def test_local_file_checked_without_the_shipped_files(self):
        """No shipped files found: the local file is still checked, and one item says so."""
        self.patch(import_config, "builtin_directories",
                   lambda: [os.path.abspath(self.mktemp())])
        code, summary, _ = self.run_tool(self.source(self.LOCAL, "milter-manager.local.conf"))
        self.assertEqual(code, 2)
        text = "\n".join(summary)
        self.assertIn('needs milter-manager\'s applicable-conditions files', text)
        self.assertNotIn("does not load", text)
        self.assertIn('    milter.applicable_conditions = ["Remote Network", "Unauthenticated"]\n',
                      self.written("milter-manager.local.conf"))

    def test_helpers_translate(self):
        """The helpers of the built-ins (s25r, dnsbl, ...) are part of the language now."""
        code, summary, python = self.translate('''
            load("applicable-conditions/*.conf")
            s25r.add_whitelist("mail.example.net")
            ''')
        self.assertEqual(code, 0, summary)
        self.assertIn('s25r.add_whitelist("mail.example.net")\n', python)

    def test_builtins_not_found(self):
        """No shipped files anywhere: the names stay, and one item says the files are needed."""
        self.patch(import_config, "builtin_directories",
                   lambda: [os.path.abspath(self.mktemp())])
        code, summary, python = self.translate(self.WITH_LOAD)
        self.assertEqual(code, 2)
        self.assertIn('milter.applicable_conditions = ["S25R", "Not DNSBL Listed"]', python)
        self.assertEqual(len([line for line in summary if line.startswith("  ")]), 1, summary)
        self.assertIn(f"  {self.output}/milter-manager.conf: its milters name milter-manager's "
                      'built-in conditions "Not DNSBL Listed", "S25R", "Trust": the translated '
                      "configuration needs milter-manager's applicable-conditions files "
                      "(installed by the package in /etc/milter-manager/applicable-conditions/) "
                      "to load; none found in ", "\n".join(summary))

    def test_builtins_not_found_but_unused(self):
        """No shipped files, and no milter naming a built-in: nothing to report."""
        self.patch(import_config, "builtin_directories",
                   lambda: [os.path.abspath(self.mktemp())])
        code, summary, _ = self.translate('load("applicable-conditions/*.conf")\n')
        self.assertEqual(code, 0, summary)

    def test_other_errors_reported_without_builtins(self):
        """Without the shipped files the rest of the output is still checked."""
        self.patch(import_config, "builtin_directories",
                   lambda: [os.path.abspath(self.mktemp())])
        code, summary, _ = self.translate('''
            load("applicable-conditions/*.conf")
            define_milter("a") do |milter|
              milter.applicable_conditions = ["S25R"]
            end
            ''')
        self.assertEqual(code, 2)
        attention = [line for line in summary if line.startswith("  ")]
        self.assertEqual(len(attention), 2, summary)
        self.assertIn("connection_spec is required", attention[0])
        self.assertIn("needs milter-manager's applicable-conditions files", attention[1])

    def test_upstream_files_are_not_ours(self):
        """A directory still holding upstream's Ruby condition files is passed over."""
        ruby = os.path.abspath(self.mktemp())
        for name in import_config.BUILTIN_CONDITION_FILES:
            self.source('define_applicable_condition("S25R") do |condition|\nend\n',
                        os.path.join("applicable-conditions", name), ruby)
        self.assertIsNone(import_config.find_builtin_directory([ruby]))
        self.assertEqual(import_config.find_builtin_directory([ruby, SHIPPED]), SHIPPED)

    def test_checkout_is_searched_first(self):
        """From a checkout, its etc/ is where the shipped files are found."""
        self.assertEqual(import_config.builtin_directories()[0], SHIPPED)
        self.assertEqual(import_config.find_builtin_directory(), SHIPPED)

    def test_errors_in_the_output_name_the_output(self):
        """The check runs on a scratch copy; an error names the written file and line."""
        code, summary, _ = self.translate('''
            load("applicable-conditions/*.conf")
            define_milter("a") do |milter|
              milter.applicable_conditions = ["S25R"]
            end
            ''')
        self.assertEqual(code, 2)
        self.assertTrue(summary[-2].startswith(
            f'  {self.output}/milter-manager.conf:4: the translated configuration does not '
            'load: milter "a": connection_spec is required'), summary)


class CommandTests(ImportTestCase):
    def test_refuses_the_source_directory(self):
        """Writing into the Ruby files' own directory is refused: exit 1, nothing written."""
        path = self.source('log.level = "all"\n')
        self.output = os.path.dirname(path)
        code, summary, errors = self.run_tool(path)
        self.assertEqual((code, summary), (1, []))
        self.assertIn("the output directory is the input's", errors)
        with open(path, encoding="utf-8") as file:
            self.assertEqual(file.read(), 'log.level = "all"\n')

    def test_refuses_to_overwrite_without_force(self):
        """An existing output file is kept unless --force."""
        path = self.source('log.level = "all"\n')
        os.makedirs(self.output)
        target = os.path.join(self.output, "milter-manager.conf")
        with open(target, "w") as file:
            file.write("mine\n")
        code, _, errors = self.run_tool(path)
        self.assertEqual(code, 1)
        self.assertIn("exists; choose another -o directory or give --force", errors)
        self.assertEqual(self.written("milter-manager.conf"), "mine\n")
        code, _, _ = self.run_tool(path, "--force")
        self.assertEqual(code, 0)
        self.assertEqual(self.written("milter-manager.conf"), HEADER + 'log.level = "all"\n')

    def test_missing_input(self):
        """A missing input file is an error, exit 1."""
        code, _, errors = self.run_tool(os.path.join(self.mktemp(), "milter-manager.conf"))
        self.assertEqual(code, 1)
        self.assertIn("No such file or directory", errors)

    def test_not_utf8(self):
        """A file that is not UTF-8 is refused with advice, exit 1."""
        path = self.source("")
        with open(path, "wb") as file:
            file.write(b"# caf\xe9\n")
        code, _, errors = self.run_tool(path)
        self.assertEqual(code, 1)
        self.assertIn("is not UTF-8", errors)

    def test_usage_error(self):
        """A usage error exits 1: 2 means "translated, look at the TODOs"."""
        code, _, _ = self.run_tool("a", "b", "--no-such-option")
        self.assertEqual(code, 1)


class TokenizerTests(SynchronousTestCase):
    def test_block_comment_and_data(self):
        """=begin/=end and __END__ become comments."""
        statements = import_config.split(import_config.tokenize(
            "=begin\nnotes\n=end\nlog.level = 'all'\n__END__\ndata\n"))
        self.assertEqual([statement.kind for statement in statements],
                         ["comment", "comment", "comment", "code", "comment", "comment"])
        self.assertEqual(statements[1].comment.text, "# notes")

    def test_statement_lines(self):
        """Statements span lines inside brackets, after a trailing operator or before `.x`."""
        statements = import_config.split(import_config.tokenize(
            "a = [1,\n 2]\nb = 1 +\n 2\nc\n  .d\ne; f\n"))
        self.assertEqual([(s.line, len(s.code)) for s in statements],
                         [(1, 7), (3, 5), (5, 3), (7, 1), (7, 1)])

    def test_regex_or_divide(self):
        """A slash after a value divides; where a value may start it opens a regex."""
        kinds = [token.kind for token in import_config.tokenize("a = b / c\nx(/re/)\n")
                 if token.kind not in ("NEWLINE",)]
        self.assertEqual(kinds, ["NAME", "OP", "NAME", "OP", "NAME",
                                 "NAME", "OP", "REGEX", "OP"])
