"""Tests for the configuration language: defaults, settings, checks, loading and dumping."""

import os
import textwrap
from dataclasses import dataclass, field
from typing import ClassVar

from twisted.trial.unittest import SynchronousTestCase

from miltermanager import client, config
from miltermanager.config import ConfigurationError
from miltermanager.config.dump import section_lines
from miltermanager.config.model import InvalidValue, set_value, setting
from miltermanager.merge import Status

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATUSES = "accept, temporary-failure, reject, discard"
# Gives the milter of a test its socket, so that the one error the test pins is
# not joined by "connection_spec is required".
SPEC = '    milter.connection_spec = "inet:1@[127.0.0.1]"\n'
# One stopper of each kind, shared by the condition and dump tests.
EVERY_STOPPER = """\
    with define_applicable_condition("Every Stage") as condition:
        condition.description = "one stopper of each kind"
        @condition.define_connect_stopper
        def connect(context, host, socket_address):
            return host == "[192.0.2.1]"
        @condition.define_helo_stopper
        def helo(context, fqdn):
            return False
        @condition.define_envelope_from_stopper
        def envelope_from(context, sender):
            return False
        @condition.define_envelope_recipient_stopper
        def envelope_recipient(context, recipient):
            return not recipient.lower().endswith("@example.com>")
        @condition.define_data_stopper
        def data(context):
            return False
        @condition.define_header_stopper
        def header(context, name, value):
            return False
        @condition.define_end_of_header_stopper
        def end_of_header(context):
            return False
        @condition.define_body_stopper
        def body(context, chunk):
            return False
        @condition.define_end_of_message_stopper
        def end_of_message(context):
            return False
        @condition.define_envelope_stopper
        def envelope(context, sender, recipients):
            return len(recipients) > 10
    """


class ConfigTestCase(SynchronousTestCase):
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def write(self, name, text):
        """Write a configuration file under the test's directory; return its absolute path.

        Modes are set whatever the umask, as a configuration must be writable by us only.
        """
        path = os.path.join(self.directory, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.chmod(os.path.dirname(path), 0o755)
        with open(path, "w", encoding="utf-8") as file:
            file.write(textwrap.dedent(text))
        os.chmod(path, 0o644)
        return path

    def load(self, text, name="milter-manager.conf"):
        return config.load(self.write(name, text))

    def assertError(self, text, line, reason, name="milter-manager.conf"):
        """Loading text fails with exactly "FILE:LINE: reason"."""
        path = self.write(name, text)
        error = self.assertRaises(ConfigurationError, config.load, path)
        self.assertEqual(str(error), f"{path}:{line}: {reason}")
        self.assertEqual(error.location, f"{path}:{line}")
        return error


class DefaultsTests(ConfigTestCase):
    def test_default(self):
        """default() listens on inet:10025@[127.0.0.1] with no child and upstream's values."""
        configuration = config.default()
        manager = configuration.manager
        self.assertEqual(manager.connection_spec, "inet:10025@[127.0.0.1]")
        self.assertIs(manager.fallback_status, Status.ACCEPT)
        self.assertEqual(manager.chunk_size, 65535)
        self.assertEqual(manager.unix_socket_mode, 0o660)
        self.assertIsNone(manager.unix_socket_group)
        self.assertIs(manager.remove_unix_socket_on_create, True)
        self.assertEqual(manager.max_body_memory, 5 * 1024 * 1024)
        self.assertEqual(manager.progress_interval, 10.0)
        self.assertEqual(configuration.milters, [])

    def test_security_and_log_defaults(self):
        """security.* and log.* default as upstream."""
        configuration = config.default()
        self.assertIsNone(configuration.security.effective_user)
        self.assertIsNone(configuration.security.effective_group)
        self.assertEqual(configuration.log.level, "default")
        self.assertIsNone(configuration.log.path)
        self.assertIs(configuration.log.use_syslog, True)
        self.assertEqual(configuration.log.syslog_facility, "mail")

    def test_empty_file(self):
        """An empty file is the default configuration, and records that it was loaded."""
        path = self.write("milter-manager.conf", "")
        configuration = config.load(path)
        self.assertEqual(configuration, config.default())
        self.assertEqual(configuration.files, [path])

    def test_milter_defaults(self):
        """A child gets upstream's defaults: enabled, accept, timeouts 297/7/7/297."""
        milter = self.load("""\
            with define_milter("clamav") as milter:
                milter.connection_spec = "inet:3310@[127.0.0.1]"
            """).milters[0]
        self.assertEqual(milter, config.MilterConfig("clamav", "inet:3310@[127.0.0.1]"))
        self.assertIsNone(milter.description)
        self.assertIs(milter.enabled, True)
        self.assertIs(milter.fallback_status, Status.ACCEPT)
        self.assertIs(milter.evaluation_mode, False)
        self.assertEqual(milter.applicable_conditions, [])
        self.assertEqual(milter.timeouts, client.Timeouts())
        self.assertEqual(milter.timeouts, client.Timeouts(297.0, 7.0, 7.0, 297.0))


class SettingTests(ConfigTestCase):
    def test_manager_settings(self):
        """Every manager.* setting is stored, converted to its type."""
        manager = self.load("""\
            manager.connection_spec = "unix:/run/milter-manager/milter-manager.sock"
            manager.fallback_status = "Temporary_Failure"
            manager.chunk_size = 4096
            manager.unix_socket_mode = 0o600
            manager.unix_socket_group = "postfix"
            manager.remove_unix_socket_on_create = False
            manager.max_body_memory = 0
            manager.progress_interval = 0
            """).manager
        self.assertEqual(manager.connection_spec, "unix:/run/milter-manager/milter-manager.sock")
        self.assertIs(manager.fallback_status, Status.TEMPORARY_FAILURE)
        self.assertEqual(manager.chunk_size, 4096)
        self.assertEqual(manager.unix_socket_mode, 0o600)
        self.assertEqual(manager.unix_socket_group, "postfix")
        self.assertIs(manager.remove_unix_socket_on_create, False)
        self.assertEqual(manager.max_body_memory, 0)
        self.assertEqual(manager.progress_interval, 0.0)

    def test_unix_socket_mode_as_string(self):
        """A mode may be an octal string, as upstream's 0660 reads."""
        self.assertEqual(self.load('manager.unix_socket_mode = "0640"').manager.unix_socket_mode,
                         0o640)

    def test_twisted_endpoint_spec(self):
        """A Twisted endpoint string is a connection spec too."""
        spec = "tcp:port=10025:interface=127.0.0.1"
        self.assertEqual(self.load(f'manager.connection_spec = "{spec}"').manager.connection_spec,
                         spec)

    def test_security_and_log_settings(self):
        """security.* and log.* are stored."""
        configuration = self.load("""\
            security.effective_user = "milter-manager"
            security.effective_group = "mail"
            log.level = "error|warning | statistics"
            log.path = "/var/log/milter-manager.log"
            log.use_syslog = False
            log.syslog_facility = "local3"
            """)
        self.assertEqual(configuration.security.effective_user, "milter-manager")
        self.assertEqual(configuration.security.effective_group, "mail")
        self.assertEqual(configuration.log.level, "error|warning | statistics")
        self.assertEqual(configuration.log.path, "/var/log/milter-manager.log")
        self.assertIs(configuration.log.use_syslog, False)
        self.assertEqual(configuration.log.syslog_facility, "local3")

    def test_milter_settings(self):
        """Every milter.* setting is stored; timeouts also as client.Timeouts."""
        milter = self.load("""\
            with define_milter("opendkim") as milter:
                milter.connection_spec = "inet:8891@[127.0.0.1]"
                milter.description = "DKIM"
                milter.enabled = False
                milter.fallback_status = "reject"
                milter.evaluation_mode = True
                milter.connection_timeout = 1
                milter.writing_timeout = 2.5
                milter.reading_timeout = 3
                milter.end_of_message_timeout = 4
                milter.applicable_conditions = ["Remote Network"]
                milter.add_applicable_condition("S25R")
            define_applicable_condition("Remote Network")
            define_applicable_condition("S25R")
            """).milters[0]
        self.assertEqual(milter.connection_spec, "inet:8891@[127.0.0.1]")
        self.assertEqual(milter.description, "DKIM")
        self.assertIs(milter.enabled, False)
        self.assertIs(milter.fallback_status, Status.REJECT)
        self.assertIs(milter.evaluation_mode, True)
        self.assertEqual(milter.timeouts, client.Timeouts(1.0, 2.5, 3.0, 4.0))
        self.assertIsInstance(milter.connection_timeout, float)
        self.assertEqual(milter.applicable_conditions, ["Remote Network", "S25R"])

    def test_read_back(self):
        """A file can read settings back, and a milter's name."""
        configuration = self.load("""\
            manager.chunk_size = manager.chunk_size // 2
            with define_milter("a") as milter:
                milter.connection_spec = "inet:1@[127.0.0.1]"
                milter.description = milter.name + " " + str(milter.writing_timeout)
            """)
        self.assertEqual(configuration.manager.chunk_size, 32767)
        self.assertEqual(configuration.milters[0].description, "a 7.0")

    def test_without_with(self):
        """define_milter also works without `with`."""
        configuration = self.load("""\
            milter = define_milter("a")
            milter.connection_spec = "inet:1@[127.0.0.1]"
            """)
        self.assertEqual(configuration.milters[0].connection_spec, "inet:1@[127.0.0.1]")

    def test_origins(self):
        """Each assigned value remembers FILE:LINE; defaults have no origin."""
        path = self.write("milter-manager.conf", """\

            manager.chunk_size = 4096
            with define_milter("a") as milter:
                milter.connection_spec = "inet:1@[127.0.0.1]"
            """)
        configuration = config.load(path)
        self.assertEqual(configuration.manager.origins, {"chunk_size": f"{path}:2"})
        self.assertEqual(configuration.milters[0].origins,
                         {"name": f"{path}:3", "connection_spec": f"{path}:4"})


class MilterOrderTests(ConfigTestCase):
    def test_order(self):
        """Children keep the order they were defined in."""
        configuration = self.load("""\
            for name in ("a", "b", "c"):
                define_milter(name).connection_spec = "inet:1@[127.0.0.1]"
            """)
        self.assertEqual([milter.name for milter in configuration.milters], ["a", "b", "c"])

    def test_redefinition_updates_and_moves_to_the_end(self):
        """Defining a name again updates that milter and moves it last, as upstream."""
        configuration = self.load("""\
            for name in ("a", "b", "c"):
                with define_milter(name) as milter:
                    milter.connection_spec = "inet:1@[127.0.0.1]"
                    milter.description = name
            with define_milter("a") as milter:
                milter.enabled = False
            """)
        self.assertEqual([milter.name for milter in configuration.milters], ["b", "c", "a"])
        self.assertEqual(configuration.milter("a").description, "a")
        self.assertIs(configuration.milter("a").enabled, False)
        self.assertEqual([milter.name for milter in configuration.enabled_milters], ["b", "c"])

    def test_defined_milters_and_remove_milter(self):
        """defined_milters lists names (iterable or called); remove_milter forgets one."""
        configuration = self.load("""\
            for name in ("a", "b"):
                define_milter(name).connection_spec = "inet:1@[127.0.0.1]"
            seen = list(defined_milters)
            remove_milter("a")
            remove_milter("never-defined")
            manager.unix_socket_group = ",".join(seen + defined_milters())
            if "a" not in defined_milters and len(defined_milters) == 1:
                manager.chunk_size = 1
            """)
        self.assertEqual([milter.name for milter in configuration.milters], ["b"])
        self.assertEqual(configuration.manager.unix_socket_group, "a,b,b")
        self.assertEqual(configuration.manager.chunk_size, 1)

    def test_missing_connection_spec(self):
        """An enabled milter left without connection_spec fails at the end of loading."""
        self.assertError(
            """\
            manager.chunk_size = 10
            with define_milter("clamav") as milter:
                milter.description = "no socket"
            """, 2,
            'milter "clamav": connection_spec is required '
            '(where the child milter listens, e.g. "inet:8891@[127.0.0.1]")')

    def test_missing_connection_spec_set_by_a_later_file(self):
        """A connection_spec given by a later file satisfies the requirement."""
        self.write("milter-manager.local.conf", """\
            define_milter("clamav").connection_spec = "inet:3310@[127.0.0.1]"
            """)
        configuration = self.load("""\
            define_milter("clamav").description = "socket set by the local file"
            load_if_exist("milter-manager.local.conf")
            """)
        self.assertEqual(configuration.milters[0].connection_spec, "inet:3310@[127.0.0.1]")

    def test_disabled_milter_needs_no_connection_spec(self):
        """A disabled milter is never contacted, so it may lack connection_spec."""
        configuration = self.load('define_milter("clamav").enabled = False\n')
        self.assertIsNone(configuration.milters[0].connection_spec)
        self.assertEqual(configuration.enabled_milters, [])


class ValidationTests(ConfigTestCase):
    """Each refused value: the exact FILE:LINE and what was expected."""

    def test_manager_fallback_status(self):
        """manager.fallback_status takes the four fallback statuses only."""
        self.assertError(
            'manager.fallback_status = "continue"\n', 1,
            f"manager.fallback_status must be one of {STATUSES}; got 'continue'")

    def test_milter_fallback_status(self):
        """A milter's bad fallback_status is reported with the milter's name and line."""
        self.assertError(
            """\
            # clamav
            with define_milter("clamav") as milter:
                milter.connection_spec = "inet:3310@[127.0.0.1]"

                milter.fallback_status = "maybe"
            """, 5,
            f"milter \"clamav\": fallback_status must be one of {STATUSES}; got 'maybe'")

    def test_fallback_status_not_a_string(self):
        """A status that is no string is refused, not crashed on."""
        self.assertError(
            "manager.fallback_status = 1\n", 1,
            f"manager.fallback_status must be one of {STATUSES}; got 1")

    def test_manager_connection_spec(self):
        """A bad manager.connection_spec says why and which forms are expected."""
        error = self.assertError(
            'manager.connection_spec = "bogus:1"\n', 1,
            "manager.connection_spec: bad connection spec 'bogus:1': unknown type 'bogus'; "
            + config.model.connection_spec.EXPECTED)
        self.assertIn("inet:PORT@[ADDRESS]", error.reason)

    def test_milter_connection_spec(self):
        """A bad milter connection_spec names the milter."""
        self.assertError(
            'define_milter("a").connection_spec = "inet:99999"\n', 1,
            "milter \"a\": connection_spec: bad connection spec 'inet:99999': port 99999 is "
            "over 65535; " + config.model.connection_spec.EXPECTED)

    def test_connection_spec_not_a_string(self):
        """A connection spec that is no string is refused."""
        error = self.assertRaises(
            ConfigurationError, self.load, "manager.connection_spec = 10025\n")
        self.assertTrue(error.reason.startswith(
            "manager.connection_spec: connection spec 10025 is not a string"))

    def test_chunk_size(self):
        """chunk_size is an integer from 1 to 65535."""
        for value in ("0", "65536", "1.5", "True", '"4096"'):
            self.assertError(
                f"\nmanager.chunk_size = {value}\n", 2,
                f"manager.chunk_size must be an integer from 1 to 65535; got {eval(value)!r}")

    def test_booleans(self):
        """A boolean setting takes True or False only, not 1 or "true"."""
        self.assertError(
            "manager.remove_unix_socket_on_create = 1\n", 1,
            "manager.remove_unix_socket_on_create must be True or False; got 1")
        self.assertError(
            'log.use_syslog = "false"\n', 1, "log.use_syslog must be True or False; got 'false'")
        for name in ("enabled", "evaluation_mode"):
            self.assertError(
                f'with define_milter("a") as milter:\n    milter.{name} = "yes"\n' + SPEC, 2,
                f"milter \"a\": {name} must be True or False; got 'yes'")

    def test_timeouts(self):
        """Timeouts are numbers of seconds greater than 0."""
        for name in ("connection_timeout", "writing_timeout", "reading_timeout",
                     "end_of_message_timeout"):
            for value in ("0", "-1", '"7"', "False", 'float("inf")'):
                self.assertError(
                    f'with define_milter("a") as milter:\n    milter.{name} = {value}\n' + SPEC,
                    2,
                    f'milter "a": {name} must be a number of seconds greater than 0; '
                    f"got {eval(value)!r}")

    def test_progress_interval(self):
        """progress_interval is 0 or more seconds."""
        self.assertError(
            "manager.progress_interval = -0.5\n", 1,
            "manager.progress_interval must be a number of seconds, 0 or more (0 disables it); "
            "got -0.5")

    def test_max_body_memory(self):
        """max_body_memory is a whole number of bytes, 0 or more."""
        self.assertError(
            "manager.max_body_memory = 1.5e6\n", 1,
            "manager.max_body_memory must be an integer, 0 or more; got 1500000.0")

    def test_unix_socket_mode(self):
        """A mode beyond 0o777, such as 660 written in decimal, is refused."""
        for value in ("660", '"rw"', "-1"):
            self.assertError(
                f"manager.unix_socket_mode = {value}\n", 1,
                "manager.unix_socket_mode must be a permission mode from 0o000 to 0o777, "
                f"written in octal (0o660); got {eval(value)!r}")

    def test_ruby_octal_literal(self):
        """Upstream's 0660 is a Python syntax error, reported with its line."""
        error = self.assertRaises(
            ConfigurationError, self.load, "\n\nmanager.unix_socket_mode = 0660\n")
        self.assertTrue(error.location.endswith(":3"))
        self.assertIn("0o", error.reason)

    def test_texts(self):
        """Names such as effective_user are non-empty strings or None."""
        self.assertError(
            "security.effective_user = 0\n", 1,
            "security.effective_user must be a non-empty string without NUL characters, "
            "or None; got 0")
        self.assertError(
            'with define_milter("a") as milter:\n    milter.description = ""\n' + SPEC, 2,
            "milter \"a\": description must be a non-empty string without NUL characters, "
            "or None; got ''")
        self.assertError(
            'with define_milter("a") as milter:\n    milter.command = "/bin/x\\0y"\n' + SPEC, 2,
            "milter \"a\": command must be a non-empty string without NUL characters, "
            "or None; got '/bin/x\\x00y'")

    def test_applicable_conditions(self):
        """applicable_conditions is a list of names, not one string."""
        self.assertError(
            'with define_milter("a") as milter:\n'
            '    milter.applicable_conditions = "Remote Network"\n' + SPEC, 2,
            'milter "a": applicable_conditions must be a list of names (non-empty strings); '
            "got 'Remote Network'")

    def test_log_level(self):
        """log.level is |-joined upstream level names."""
        levels = ", ".join(config.model.LOG_LEVELS)
        self.assertError(
            'log.level = "error|verbose"\n', 1,
            f"log.level has no level 'verbose': the names joined with | are each one of {levels}"
            "; got 'error|verbose'")
        for value in ('""', "3", "None"):
            self.assertError(
                f"log.level = {value}\n", 1,
                f"log.level must be level names joined with |, each one of {levels}"
                f"; got {eval(value)!r}")

    def test_syslog_facility(self):
        """log.syslog_facility is one of syslog's facilities."""
        error = self.assertError(
            'log.syslog_facility = "local8"\n', 1,
            "log.syslog_facility must be one of "
            + ", ".join(config.model.SYSLOG_FACILITIES) + "; got 'local8'")
        self.assertIn("local7", error.reason)

    def test_milter_name(self):
        """define_milter needs a non-empty string name; name is read-only."""
        self.assertError(
            "define_milter(None)\n", 1,
            "define_milter needs a name (a non-empty string); got None")
        self.assertError(
            'with define_milter("a") as milter:\n    milter.name = "b"\n' + SPEC, 2,
            'milter "a": name is read-only')


class TimeoutAndDownChildSettingsTests(ConfigTestCase):
    """manager.negotiation_timeout, idle_timeout and the down-child settings (ours)."""

    NAMES = ("negotiation_timeout", "idle_timeout", "down_after_failures",
             "down_retry_interval", "max_down_retry_interval")

    def test_defaults(self):
        """30 s to negotiate, 7210 s idle, down after 3 failures, retried after 5 s to 60 s."""
        manager = config.default().manager
        self.assertEqual([getattr(manager, name) for name in self.NAMES],
                         [30.0, 7210.0, 3, 5.0, 60.0])
        self.assertEqual(manager.down_retry_limit, 60.0)

    def test_accepted(self):
        """Seconds are stored as floats; 0 turns off the timeouts and the marking down."""
        manager = self.load("""\
            manager.negotiation_timeout = 0
            manager.idle_timeout = 0
            manager.down_after_failures = 0
            manager.down_retry_interval = 1
            manager.max_down_retry_interval = 0.5
            """).manager
        self.assertEqual([getattr(manager, name) for name in self.NAMES],
                         [0.0, 0.0, 0, 1.0, 0.5])
        self.assertIsInstance(manager.negotiation_timeout, float)
        self.assertIsInstance(manager.down_retry_interval, float)
        manager = self.load("""\
            manager.negotiation_timeout = 2.5
            manager.idle_timeout = 3600
            manager.down_after_failures = 10
            """).manager
        self.assertEqual((manager.negotiation_timeout, manager.idle_timeout,
                          manager.down_after_failures), (2.5, 3600.0, 10))

    def test_cap_below_first_interval(self):
        """A cap below down_retry_interval is taken as down_retry_interval, not refused."""
        manager = self.load("manager.down_retry_interval = 120\n").manager
        self.assertEqual(manager.max_down_retry_interval, 60.0)
        self.assertEqual(manager.down_retry_limit, 120.0)
        manager = self.load("manager.down_retry_interval = 1\n"
                            "manager.max_down_retry_interval = 30\n").manager
        self.assertEqual(manager.down_retry_limit, 30.0)

    def test_timeouts_refused(self):
        """The two MTA timeouts are 0 or more seconds."""
        for name in ("negotiation_timeout", "idle_timeout"):
            for value in ("-1", '"30"', "None", "True", 'float("nan")'):
                self.assertError(
                    f"manager.{name} = {value}\n", 1,
                    f"manager.{name} must be a number of seconds, 0 or more (0 disables it); "
                    f"got {eval(value)!r}")

    def test_down_after_failures_refused(self):
        """down_after_failures is a whole number, 0 or more."""
        for value in ("-1", "2.0", '"3"', "None", "True"):
            self.assertError(
                f"manager.down_after_failures = {value}\n", 1,
                "manager.down_after_failures must be an integer, 0 or more "
                f"(0 never marks a child down); got {eval(value)!r}")

    def test_retry_intervals_refused(self):
        """The retry intervals are seconds greater than 0."""
        for name in ("down_retry_interval", "max_down_retry_interval"):
            for value in ("0", "-5", '"5"', "None", 'float("inf")'):
                self.assertError(
                    f"manager.{name} = {value}\n", 1,
                    f"manager.{name} must be a number of seconds greater than 0; "
                    f"got {eval(value)!r}")

    def test_dumped(self):
        """dump (--show-config) shows each, set or default, and loads it back."""
        path = self.write("milter-manager.conf", """\
            manager.idle_timeout = 600
            manager.down_after_failures = 0
            """)
        configuration = config.load(path)
        dumped = config.dump(configuration)
        lines = dumped.splitlines()
        self.assertIn("manager.negotiation_timeout = 30.0  # default", lines)
        self.assertIn(f"manager.idle_timeout = 600.0  # {path}:1", lines)
        self.assertIn(f"manager.down_after_failures = 0  # {path}:2", lines)
        self.assertIn("manager.down_retry_interval = 5.0  # default", lines)
        self.assertIn("manager.max_down_retry_interval = 60.0  # default", lines)
        self.assertEqual(config.load(self.write("dumped.conf", dumped)), configuration)


class UnknownAttributeTests(ConfigTestCase):
    def test_unknown_milter_setting(self):
        """A misspelt milter setting fails, suggesting and listing the known ones.

        The milter is then left without its socket, which is reported too.
        """
        path = self.write("milter-manager.conf", """\
            with define_milter("a") as milter:
                milter.conection_spec = "inet:1@[127.0.0.1]"
            """)
        error = self.assertRaises(ConfigurationError, config.load, path)
        self.assertEqual([str(each) for each in error.errors], [
            f"{path}:2: milter \"a\" has no setting 'conection_spec'; did you mean "
            "connection_spec? known: add_applicable_condition, applicable_conditions, command, "
            "command_options, connection_spec, connection_timeout, description, enabled, "
            "end_of_message_timeout, evaluation_mode, fallback_status, name, reading_timeout, "
            "user_name, writing_timeout",
            f'{path}:1: milter "a": connection_spec is required (where the child milter '
            'listens, e.g. "inet:8891@[127.0.0.1]")'])

    def test_unknown_manager_setting(self):
        """Assigning an unknown manager setting fails, suggesting and listing settings and verbs."""
        error = self.assertError(
            "manager.n_worker = 4\n", 1,
            "manager has no setting 'n_worker'; did you mean n_workers? known: "
            + ", ".join(sorted({*config.settings_of(config.ManagerConfig()),
                                "define_connection_checker", "event_loop_created", "maintained",
                                "use_netstat_connection_checker"})))
        self.assertIn("use_netstat_connection_checker", error.reason)

    def test_unknown_setting_without_suggestion(self):
        """A name like no known one gets the list without a guess."""
        self.assertError(
            "controller.xyzzy = 1\n", 1,
            "controller has no setting 'xyzzy'; known: connection_spec, "
            "remove_unix_socket_on_close, remove_unix_socket_on_create, trace_sessions, "
            "unix_socket_group, unix_socket_mode")

    def test_reading_an_unknown_setting(self):
        """Reading an unknown setting fails the same way, with its line."""
        self.assertError(
            "\nx = security.effective_usr\n", 2,
            "security has no setting 'effective_usr'; did you mean effective_user? known: "
            "effective_group, effective_user, privilege_mode")

    def test_getattr_default(self):
        """An unknown setting is an AttributeError, so getattr with a default works."""
        configuration = self.load(
            'manager.unix_socket_group = getattr(manager, "nope", "mail")\n')
        self.assertEqual(configuration.manager.unix_socket_group, "mail")


class FileErrorTests(ConfigTestCase):
    def test_syntax_error(self):
        """A syntax error names its file and line."""
        self.assertError(
            "manager.chunk_size = 1\nwith define_milter('a') as milter\n", 2,
            "syntax error: expected ':'")

    def test_exception_raised_by_the_file(self):
        """An exception raised by the file's own code names the line that raised it."""
        self.assertError(
            "manager.chunk_size = 1\nraise RuntimeError('no')\n", 2, "RuntimeError: no")

    def test_exception_in_a_function_of_the_file(self):
        """An exception inside a function defined in the file names the line inside it."""
        self.assertError(
            "def f():\n    return 1 / 0\n\nf()\n", 2, "ZeroDivisionError: division by zero")

    def test_unknown_name(self):
        """A name the language does not have is a NameError with its line."""
        self.assertError(
            "\ndefine_condition('x')\n", 2, "NameError: name 'define_condition' is not defined")

    def test_missing_file(self):
        """A missing top-level file is an error without a line."""
        path = os.path.join(self.directory, "nope.conf")
        error = self.assertRaises(ConfigurationError, config.load, path)
        self.assertEqual(str(error), f"cannot read {path}: No such file or directory")
        self.assertIsNone(error.location)


class LoadTests(ConfigTestCase):
    def test_load_relative_to_the_including_file(self):
        """load(path) is relative to the including file's directory, not the working one."""
        self.write("sub/child.conf", 'load("grandchild.conf")\n')
        self.write("sub/grandchild.conf", "manager.chunk_size = 7\n")
        path = self.write("milter-manager.conf", 'load("sub/child.conf")\n')
        configuration = config.load(path)
        self.assertEqual(configuration.manager.chunk_size, 7)
        self.assertEqual(configuration.files, [
            os.path.join(self.directory, "sub", "grandchild.conf"),
            os.path.join(self.directory, "sub", "child.conf"), path])

    def test_load_glob_in_name_order(self):
        """load(glob) loads every match, sorted by name."""
        for name, port in (("20-b", 2), ("10-a", 1)):
            self.write(f"conf.d/{name}.conf",
                       f'define_milter("{name[-1]}").connection_spec = "inet:{port}@[127.0.0.1]"\n')
        self.write("conf.d/ignored.txt", "raise RuntimeError\n")
        configuration = self.load('load("conf.d/*.conf")\n')
        self.assertEqual([milter.name for milter in configuration.milters], ["a", "b"])

    def test_load_glob_without_match(self):
        """A glob that matches nothing loads nothing, and says so with its FILE:LINE."""
        path = self.write("milter-manager.conf", '\nload("conf.d/*.conf")\n')
        configuration = config.load(path)
        self.assertEqual(configuration, config.default())
        self.assertEqual(configuration.warnings, [
            f"{path}:2: load('conf.d/*.conf') matched no file (looked in {self.directory})"])
        path = self.write("absolute.conf", "load('/nonexistent/*.conf')\n")
        self.assertEqual(config.load(path).warnings, [
            f"{path}:1: load('/nonexistent/*.conf') matched no file"])

    def test_load_missing_file(self):
        """load of a missing file names the including line."""
        missing = os.path.join(self.directory, "nope.conf")
        self.assertError(
            '\nload("nope.conf")\n', 2, f"cannot read {missing}: No such file or directory")

    def test_load_if_exist(self):
        """load_if_exist skips a missing file and loads an existing one, relatively."""
        self.write("milter-manager.local.conf", "manager.chunk_size = 9\n")
        configuration = self.load("""\
            load_if_exist("nope.conf")
            load_if_exist("milter-manager.local.conf")
            load_default()
            """)
        self.assertEqual(configuration.manager.chunk_size, 9)

    def test_error_in_included_file(self):
        """An error in an included file names that file and its line."""
        self.write("sub.conf", "\n\nmanager.chunk_size = 0\n")
        path = self.write("milter-manager.conf", 'load("sub.conf")\n')
        error = self.assertRaises(ConfigurationError, config.load, path)
        self.assertEqual(
            str(error), os.path.join(self.directory, "sub.conf")
            + ":3: manager.chunk_size must be an integer from 1 to 65535; got 0")

    def test_syntax_error_in_included_file(self):
        """A syntax error in an included file names that file."""
        self.write("sub.conf", "manager.chunk_size = = 1\n")
        path = self.write("milter-manager.conf", '\nload("sub.conf")\n')
        error = self.assertRaises(ConfigurationError, config.load, path)
        self.assertTrue(str(error).startswith(
            os.path.join(self.directory, "sub.conf") + ":1: syntax error: "))

    def test_load_loop(self):
        """A file that ends up loading itself is an error, not a recursion crash."""
        self.write("a.conf", '\nload("b.conf")\n')
        self.write("b.conf", 'load("a.conf")\n')
        a = os.path.join(self.directory, "a.conf")
        error = self.assertRaises(ConfigurationError, config.load, a)
        self.assertEqual(str(error), os.path.join(self.directory, "b.conf")
                         + f":1: {a} is already being loaded (a load loop)")

    def test_files_do_not_share_variables(self):
        """Each file has its own variables, as each upstream file has its own locals."""
        self.write("sub.conf", "manager.chunk_size = size\n")
        path = self.write("milter-manager.conf", 'size = 5\nload("sub.conf")\n')
        error = self.assertRaises(ConfigurationError, config.load, path)
        self.assertIn("NameError: name 'size' is not defined", str(error))


BUILTIN_CONDITIONS = (
    "S25R", "Remote Network", "Authenticated", "Unauthenticated", "Sendmail Compatible",
    "Stress Notify", "No Stress", "Trust", "DNSBL Listed", "Not DNSBL Listed", "LDAP Policy",
)


class ShippedFilesTests(SynchronousTestCase):
    # strict=False: the checkout's modes follow the developer's umask; the
    # installed files' modes are the package's business.

    def test_milter_manager_conf(self):
        """etc/milter-manager.conf loads the conditions, debian defaults, and is the defaults."""
        path = os.path.join(ROOT, "etc", "milter-manager.conf")
        # An empty tree for milter detection: this machine's own milters stay out.
        configuration = config.load(path, strict=False, detect_root=self.mktemp())
        conditions = os.path.join(ROOT, "etc", "applicable-conditions")
        self.assertEqual(sorted(configuration.conditions), sorted(BUILTIN_CONDITIONS))
        configuration.conditions = {}
        self.assertEqual(configuration, config.default())
        self.assertEqual(configuration.files, [
            *(os.path.join(conditions, name) for name in sorted(os.listdir(conditions))
              if name.endswith(".conf")),
            os.path.join(ROOT, "etc", "defaults", "debian.conf"), path])

    def test_milter_manager_conf_loads(self):
        """The shipped file has upstream's three loading lines."""
        with open(os.path.join(ROOT, "etc", "milter-manager.conf"), encoding="utf-8") as file:
            lines = file.read().splitlines()
        for line in ('load("applicable-conditions/*.conf")', "load_default()",
                     'load_if_exist("milter-manager.local.conf")'):
            self.assertTrue(any(text.startswith(line) for text in lines), line)

    def test_milter_manager_conf_defaults_are_true(self):
        """The commented defaults in etc/milter-manager.conf are every setting's real default."""
        path = os.path.join(ROOT, "etc", "milter-manager.conf")
        sections = ("package.", "security.", "log.", "manager.", "controller.", "web.")
        with open(path, encoding="utf-8") as file:
            lines = [line[2:] for line in file
                     if line.startswith(tuple(f"# {name}" for name in sections))
                     or line.startswith("#     milter.")]
        source = "with define_milter('x') as milter:\n" + "".join(
            line if line.startswith("    milter.") else "    " + line for line in lines)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        uncommented = os.path.join(directory, "uncommented.conf")
        with open(uncommented, "w", encoding="utf-8") as file:
            file.write(source)
        configuration = config.load(uncommented, strict=False)
        expected = config.default()
        expected.milters.append(config.MilterConfig("x", "inet:8891@[127.0.0.1]"))
        self.assertEqual(configuration, expected)
        every = sum(len(config.settings_of(section))
                    for section in [*expected.sections(), expected.milters[0]])
        self.assertEqual(len(lines), every, "each setting is shown once")

    def test_documentation_names_every_setting(self):
        """docs/configuration.md has a row for every setting and every stopper."""
        with open(os.path.join(ROOT, "docs", "configuration.md"), encoding="utf-8") as file:
            text = file.read()
        configuration = config.default()
        for section in (*configuration.sections(), config.MilterConfig("x"),
                        config.ConditionConfig("x")):
            prefix = getattr(section, "SECTION", None) or section.KIND
            for name in config.settings_of(section):
                self.assertIn(f"| `{prefix}.{name}` |", text)
        for kind in config.STOPPERS:
            self.assertIn(f"| `define_{kind}_stopper` |", text)

    def test_debian_defaults(self):
        """etc/defaults/debian.conf sets nothing but the milters detected (none in an empty tree).

        Detection itself is pinned in test_detect.
        """
        configuration = config.load(
            os.path.join(ROOT, "etc", "defaults", "debian.conf"), strict=False,
            detect_root=self.mktemp())
        self.assertEqual(configuration, config.default())

    def test_postfix_two_children(self):
        """The Postfix example defines a libmilter child and opendkim, which tempfails when down."""
        configuration = config.load(
            os.path.join(ROOT, "etc", "examples", "postfix-two-children.conf"), strict=False)
        self.assertEqual(configuration.manager.connection_spec, "inet:10025@[127.0.0.1]")
        self.assertEqual(
            [(milter.name, milter.connection_spec, milter.fallback_status)
             for milter in configuration.milters],
            [("libmilter-milter", "inet:10026@[127.0.0.1]", Status.ACCEPT),
             ("opendkim", "inet:8891@[127.0.0.1]", Status.TEMPORARY_FAILURE)])


class DumpTests(ConfigTestCase):
    def test_round_trip(self):
        """dump writes a file that loads back to the same configuration."""
        configuration = self.load("""\
            manager.connection_spec = "unix:/tmp/x.sock"
            manager.unix_socket_mode = 0o640
            log.level = "all"
            define_applicable_condition("Remote Network")
            with define_milter('quote"and\\\\slash') as milter:
                milter.connection_spec = "inet:1@[127.0.0.1]"
                milter.applicable_conditions = ["Remote Network"]
                milter.fallback_status = "discard"
            define_milter("off").enabled = False
            """)
        dumped = self.write("dumped.conf", config.dump(configuration))
        self.assertEqual(config.load(dumped), configuration)

    def test_helper_lists_in_effect(self):
        """dump shows each helper's lists, defaults included: what is matched and asked."""
        dumped = config.dump(self.load("""\
            dnsbl.add_service("bl.example.net", "127.0.0.2/32")
            trust.clear()
            trust.add_envelope_from_domain("example.org")
            remote_network.add_local_address("192.0.2.0/24")
            """))
        self.assertIn(
            "# dnsbl.services in effect (zones asked about each client, through "
            "dnsbl.name_servers only):\n"
            "#     'zen.spamhaus.org' listed by 127.0.0.10/31  # default\n"
            "#     'dnsbl.sorbs.net' listed by 127.0.0.10/32  # default\n"
            "#     'bl.spamcop.net' listed by 127.0.0.2/32  # default\n"
            "#     'b.barracudacentral.org' listed by 127.0.0.2/32  # default\n"
            "#     'bl.example.net' listed by 127.0.0.2/32  # added above\n", dumped)
        self.assertIn(
            "# trust.domains in effect (envelope-from domains marked {trusted_domain}=yes):\n"
            "#     'example.org'  # added above\n", dumped)
        self.assertIn("#     '.google.com'  # default\n", dumped)
        self.assertIn("#     re.compile(r'\\A[^.]*[0-9]{5}', re.IGNORECASE)  # default\n", dumped)
        self.assertIn("#     192.0.2.0/24  # added above\n"
                      "# remote_network.remote_networks in effect (remote even inside the local "
                      "ones):\n#     (none)\n", dumped)

    EVERY_ITEM = textwrap.dedent("""\
        package.platform = "redhat"
        package.options = "prefix=/usr/local"
        security.privilege_mode = True
        security.effective_user = "milter-manager"
        security.effective_group = "mail"
        log.level = "error|warning|statistics"
        log.path = "/var/log/milter-manager.log"
        log.use_syslog = False
        log.syslog_facility = "local4"
        log.syslog_socket = "/var/spool/postfix/dev/log"
        manager.use_netstat_connection_checker(3)
        manager.connection_spec = "unix:/run/milter-manager/milter-manager.sock"
        manager.unix_socket_mode = 0o600
        manager.unix_socket_group = "postfix"
        manager.remove_unix_socket_on_create = False
        manager.remove_unix_socket_on_close = False
        manager.daemon = True
        manager.pid_file = "/run/milter-manager.pid"
        manager.maintenance_interval = 0
        manager.suspend_time_on_unacceptable = 2
        manager.max_connections = 100
        manager.max_file_descriptors = 4096
        manager.custom_configuration_directory = "/var/lib/milter-manager"
        manager.fallback_status = "reject"
        manager.fallback_status_at_disconnect = "accept"
        manager.event_loop_backend = "libev"
        manager.n_workers = 4
        manager.packet_buffer_size = 8192
        manager.chunk_size = 1024
        manager.max_pending_finished_sessions = 10
        manager.connection_check_interval = 9
        manager.report_memory_statistics()
        manager.max_body_memory = 1024
        manager.progress_interval = 0
        manager.negotiation_timeout = 10
        manager.idle_timeout = 600
        manager.down_after_failures = 5
        manager.down_retry_interval = 2.5
        manager.max_down_retry_interval = 300

        @manager.define_connection_checker("always")
        def always(context):
            return True

        @manager.maintained
        def maintained():
            pass

        @manager.event_loop_created
        def created(reactor):
            return reactor

        controller.connection_spec = "inet:10026@[127.0.0.1]"
        controller.unix_socket_mode = 0o640
        controller.unix_socket_group = "adm"
        controller.remove_unix_socket_on_create = False
        controller.remove_unix_socket_on_close = False
        controller.trace_sessions = 50

        web.connection_spec = "inet:10027@[127.0.0.1]"
        web.password_file = "/etc/milter-manager/web-users"
        web.metrics_without_login = True
        web.tls_certificate = "/etc/ssl/certs/mail.pem"
        web.tls_key = "/etc/ssl/private/mail.key"
        web.session_timeout = 600
        web.custom_versions = 5

        with define_milter("clamav") as milter:
            milter.connection_spec = "inet:3310@[127.0.0.1]"
            milter.description = "virus scanner"
            milter.enabled = False
            milter.fallback_status = "temporary-failure"
            milter.evaluation_mode = True
            milter.applicable_conditions = ["Every Stage"]
            milter.add_applicable_condition("Other")
            milter.command = "/etc/init.d/clamav-milter"
            milter.command_options = ["start", "a b"]
            milter.user_name = "clamav"
            milter.connection_timeout = 1
            milter.writing_timeout = 2
            milter.reading_timeout = 3
            milter.end_of_message_timeout = 4

        with define_applicable_condition("Other") as other:
            other.description = None
        """) + textwrap.dedent(EVERY_STOPPER)

    def test_round_trip_every_item(self):
        """A configuration using every item, conditions and hooks included, dumps and reloads."""
        configuration = self.load(self.EVERY_ITEM)
        dumped = self.write("dumped.conf", config.dump(configuration))
        reloaded = config.load(dumped)
        self.assertEqual(reloaded, configuration)
        for section in (*configuration.sections(), *configuration.milters,
                        *configuration.conditions.values()):
            for name in config.settings_of(section):
                if name != "description" or section.name != "Other":
                    self.assertIn(name, section.origins, f"{section!r} sets every item")
        # The functions work in the reloaded configuration.
        connect, = reloaded.conditions["Every Stage"].stoppers_of("connect")
        self.assertIs(connect.function(None, "[192.0.2.1]", None), True)
        self.assertIs(reloaded.manager.connection_checkers["always"].function(None), True)
        # A second dump differs only in where each value was set.
        again = config.dump(reloaded).replace(dumped, "FILE")
        first = config.dump(configuration).replace(
            os.path.join(self.directory, "milter-manager.conf"), "FILE")
        strip = lambda text: [line.split("  # ")[0] for line in text.splitlines()]
        self.assertEqual(strip(again), strip(first))

    def test_dumped_condition(self):
        """A condition is dumped as a with block, each stopper from its source with FILE:LINE."""
        path = self.write("milter-manager.conf", """\
            with define_applicable_condition("Internal Only") as c:
                c.description = "ours"
                @c.define_envelope_recipient_stopper
                def external(context, recipient):
                    # only our domain
                    return not recipient.endswith("@example.com>")
                c.define_data_stopper(lambda context: False)
            """)
        dumped = config.dump(config.load(path))
        self.assertIn(
            f'with define_applicable_condition("Internal Only") as condition:  # {path}:1\n'
            f'    condition.description = "ours"  # {path}:2\n'
            f"    @condition.define_envelope_recipient_stopper  # {path}:3\n"
            "    def external(context, recipient):\n"
            "        # only our domain\n"
            '        return not recipient.endswith("@example.com>")\n'
            "\n"
            f"    # condition.define_data_stopper: <lambda> ({path}:7) is not shown: its source is "
            "unknown (a lambda?)\n", dumped)

    def test_dumped_hooks(self):
        """The netstat checker is dumped as its call, before the settings it sets."""
        path = self.write("milter-manager.conf", """\
            manager.use_netstat_connection_checker()
            manager.connection_check_interval = 60
            """)
        configuration = config.load(path)
        dumped = config.dump(configuration).splitlines()
        call = dumped.index(f"manager.use_netstat_connection_checker(5)  # {path}:1")
        interval = dumped.index(f"manager.connection_check_interval = 60.0  # {path}:2")
        self.assertLess(call, interval)
        self.assertEqual(config.load(self.write("dumped.conf", "\n".join(dumped))), configuration)

    def test_origins_in_comments(self):
        """Each value carries `# FILE:LINE`, or `# default`."""
        path = self.write("milter-manager.conf", """\
            manager.chunk_size = 4096
            with define_milter("a") as milter:
                milter.connection_spec = "inet:1@[127.0.0.1]"
            """)
        dumped = config.dump(config.load(path)).splitlines()
        self.assertIn(f"manager.chunk_size = 4096  # {path}:1", dumped)
        self.assertIn('manager.fallback_status = "accept"  # default', dumped)
        self.assertIn("manager.unix_socket_mode = 0o660  # default", dumped)
        self.assertIn(f'with define_milter("a") as milter:  # {path}:2', dumped)
        self.assertIn(f'    milter.connection_spec = "inet:1@[127.0.0.1]"  # {path}:3', dumped)
        self.assertIn("    milter.writing_timeout = 7.0  # default", dumped)


class LocateTests(SynchronousTestCase):
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def test_default_only_if_it_exists(self):
        """Without options the default directory's file is used only if it exists."""
        self.assertIsNone(config.locate(environ={}, default_directory=self.directory))
        path = os.path.join(self.directory, "milter-manager.conf")
        open(path, "w").close()
        self.assertEqual(config.locate(environ={}, default_directory=self.directory), path)

    def test_config_file_or_directory(self):
        """--config takes a file, or a directory holding milter-manager.conf."""
        self.assertEqual(config.locate("/x/y.conf", environ={}), "/x/y.conf")
        self.assertEqual(config.locate(self.directory, environ={}),
                         os.path.join(self.directory, "milter-manager.conf"))

    def test_config_dir_and_environment(self):
        """--config-dir, then $MILTER_MANAGER_CONFIG_DIR, name the directory."""
        environ = {"MILTER_MANAGER_CONFIG_DIR": "/env"}
        self.assertEqual(config.locate(None, "/dir", environ), "/dir/milter-manager.conf")
        self.assertEqual(config.locate(None, None, environ), "/env/milter-manager.conf")

    def test_both(self):
        """--config and --config-dir together are refused."""
        self.assertRaises(ConfigurationError, config.locate, "/a.conf", "/dir", {})


class UpstreamItemTests(ConfigTestCase):
    """The items of upstream's language beyond the first cut: defaults and stored values."""

    def test_custom_configuration_directory(self):
        """milter-manager.custom.conf there is loaded after the main file; absent, nothing."""
        custom = self.write("custom/milter-manager.custom.conf", "manager.chunk_size = 9\n")
        directory = os.path.dirname(custom)
        configuration = self.load(
            f"manager.custom_configuration_directory = {directory!r}\nmanager.chunk_size = 7\n")
        self.assertEqual(configuration.manager.chunk_size, 9)
        self.assertEqual(configuration.manager.origins["chunk_size"], f"{custom}:1")
        self.assertEqual(configuration.files[-1], custom)
        os.remove(custom)
        configuration = self.load(
            f"manager.custom_configuration_directory = {directory!r}\nmanager.chunk_size = 7\n")
        self.assertEqual(configuration.manager.chunk_size, 7)

    def test_custom_file_is_trust_checked(self):
        """A custom file others may write is refused like any file that runs as root."""
        custom = self.write("custom/milter-manager.custom.conf", "manager.chunk_size = 9\n")
        os.chmod(custom, 0o664)
        path = self.write("milter-manager.conf", f"manager.custom_configuration_directory = "
                                                 f"{os.path.dirname(custom)!r}\n")
        error = self.assertRaises(ConfigurationError, config.load, path)
        self.assertEqual(str(error), f"{custom}: refusing to load: mode 0664 lets others "
                                     f"change code that runs as root")

    def test_custom_file_default_directory(self):
        """None means ~EFFECTIVE_USER/.milter-manager: the effective user's home."""
        configuration = self.load('security.effective_user = "root"\n')
        self.assertEqual(config.loader.custom_file(configuration),
                         "/root/.milter-manager/milter-manager.custom.conf")
        configuration = self.load('security.effective_user = "nobody"\n')
        self.assertEqual(config.loader.custom_file(configuration),
                         "/nonexistent/.milter-manager/milter-manager.custom.conf")

    def test_suspend_time_on_unacceptable_warns(self):
        """suspend_time_on_unacceptable is accepted and warned about: nothing waits here."""
        path = self.write("milter-manager.conf", "manager.suspend_time_on_unacceptable = 9\n")
        self.assertEqual(config.load(path).warnings, [
            f"{path}:1: manager.suspend_time_on_unacceptable = 9: accepted for upstream's files; "
            "accepting resumes as soon as a connection ends below max_connections, so nothing "
            "waits a fixed time (raise max_file_descriptors if the process runs out of them)"])

    def test_controller_settings_without_warning(self):
        """controller.* takes effect (the controller socket): loading warns of nothing."""
        path = self.write("milter-manager.conf",
                          'controller.connection_spec = "inet:10026@[127.0.0.1]"\n')
        self.assertEqual(config.load(path).warnings, [])

    def test_new_defaults(self):
        """package, security, manager and controller items default as upstream."""
        configuration = config.default()
        self.assertEqual(configuration.package.platform, "debian")
        self.assertIsNone(configuration.package.options)
        self.assertEqual(configuration.package.parsed_options, {})
        self.assertIs(configuration.security.privilege_mode, False)
        manager = configuration.manager
        self.assertEqual(
            {name: getattr(manager, name) for name in (
                "remove_unix_socket_on_close", "daemon", "pid_file", "maintenance_interval",
                "suspend_time_on_unacceptable", "max_connections", "max_file_descriptors",
                "custom_configuration_directory", "fallback_status_at_disconnect",
                "event_loop_backend", "n_workers", "packet_buffer_size",
                "max_pending_finished_sessions", "connection_check_interval",
                "report_memory_statistics")},
            {"remove_unix_socket_on_close": True, "daemon": False, "pid_file": None,
             "maintenance_interval": 10, "suspend_time_on_unacceptable": 5,
             "max_connections": 0, "max_file_descriptors": 0,
             "custom_configuration_directory": None,
             "fallback_status_at_disconnect": Status.TEMPORARY_FAILURE,
             "event_loop_backend": "glib", "n_workers": 0, "packet_buffer_size": 0,
             "max_pending_finished_sessions": 0, "connection_check_interval": 0.0,
             "report_memory_statistics": False})
        self.assertEqual((manager.connection_checkers, manager.maintained_hooks,
                          manager.event_loop_created_hooks), ({}, [], []))
        controller = configuration.controller
        self.assertEqual(
            (controller.connection_spec, controller.unix_socket_mode,
             controller.unix_socket_group, controller.remove_unix_socket_on_create,
             controller.remove_unix_socket_on_close),
            (None, 0o660, None, True, True))
        self.assertEqual(configuration.conditions, {})
        milter = config.MilterConfig("a")
        self.assertEqual((milter.command, milter.command_options, milter.user_name),
                         (None, None, None))

    def test_manager_items(self):
        """Each new manager.* item is stored as written, converted to its type."""
        manager = self.load("""\
            manager.remove_unix_socket_on_close = False
            manager.daemon = True
            manager.pid_file = "/run/milter-manager/milter-manager.pid"
            manager.maintenance_interval = 100
            manager.suspend_time_on_unacceptable = 1
            manager.max_connections = 500
            manager.max_file_descriptors = 8192
            manager.custom_configuration_directory = "/var/lib/milter-manager"
            manager.fallback_status_at_disconnect = "discard"
            manager.event_loop_backend = "libev"
            manager.n_workers = 1000
            manager.packet_buffer_size = 4096
            manager.max_pending_finished_sessions = 3
            manager.connection_check_interval = 30
            manager.report_memory_statistics = True
            """).manager
        self.assertEqual(
            (manager.remove_unix_socket_on_close, manager.daemon, manager.pid_file,
             manager.maintenance_interval, manager.suspend_time_on_unacceptable,
             manager.max_connections, manager.max_file_descriptors,
             manager.custom_configuration_directory, manager.fallback_status_at_disconnect,
             manager.event_loop_backend, manager.n_workers, manager.packet_buffer_size,
             manager.max_pending_finished_sessions, manager.connection_check_interval,
             manager.report_memory_statistics),
            (False, True, "/run/milter-manager/milter-manager.pid", 100, 1, 500, 8192,
             "/var/lib/milter-manager", Status.DISCARD, "libev", 1000, 4096, 3, 30.0, True))

    def test_maintenance_interval_none(self):
        """maintenance_interval None disables maintenance, as 0 does upstream."""
        self.assertEqual(
            self.load("manager.maintenance_interval = None\n").manager.maintenance_interval, 0)

    def test_event_loop_backend_note(self):
        """event_loop_backend is accepted and noted, since Twisted's reactor runs anyway."""
        path = self.write("milter-manager.conf", '\nmanager.event_loop_backend = "libev"\n')
        configuration = config.load(path)
        self.assertEqual(configuration.warnings, [
            f"{path}:2: manager.event_loop_backend = 'libev': accepted for upstream's files; "
            "milter-manager runs on Twisted's reactor whatever the value"])
        self.assertEqual(config.load(self.write("b.conf", "")).warnings, [])

    def test_package_and_security(self):
        """package.* and security.privilege_mode are stored; privilege_mode takes "true"."""
        configuration = self.load("""\
            package.platform = "freebsd"
            package.options = "prefix=/usr/pkg, rcddir = /etc/rc.d"
            security.privilege_mode = "True"
            """)
        self.assertEqual(configuration.package.platform, "freebsd")
        self.assertEqual(configuration.package.parsed_options,
                         {"prefix": "/usr/pkg", "rcddir": "/etc/rc.d"})
        self.assertIs(configuration.security.privilege_mode, True)
        self.assertIs(self.load('security.privilege_mode = "false"').security.privilege_mode,
                      False)

    def test_controller(self):
        """controller.* is stored and checked as the manager's socket settings."""
        controller = self.load("""\
            controller.connection_spec = "unix:/run/milter-manager/controller.sock"
            controller.unix_socket_mode = 0o600
            controller.unix_socket_group = "milter-manager"
            controller.remove_unix_socket_on_create = False
            controller.remove_unix_socket_on_close = False
            """).controller
        self.assertEqual(
            (controller.connection_spec, controller.unix_socket_mode,
             controller.unix_socket_group, controller.remove_unix_socket_on_create,
             controller.remove_unix_socket_on_close),
            ("unix:/run/milter-manager/controller.sock", 0o600, "milter-manager", False, False))
        self.assertIsNone(self.load("controller.connection_spec = None\n").controller
                          .connection_spec)

    def test_milter_command(self):
        """command, user_name and command_options; a list of options is shell-quoted, joined."""
        configuration = self.load("""\
            with define_milter("spamass") as milter:
                milter.connection_spec = "unix:/run/spamass.sock"
                milter.command = "/etc/init.d/spamass-milter"
                milter.command_options = ["start", "it's here", "a b"]
                milter.user_name = "spamass"
            define_milter("other").command_options = "start --now"
            define_milter("other").connection_spec = "inet:1@[127.0.0.1]"
            """)
        milter = configuration.milter("spamass")
        self.assertEqual(milter.command, "/etc/init.d/spamass-milter")
        self.assertEqual(milter.command_options, "start 'it'\"'\"'s here' 'a b'")
        self.assertEqual(milter.user_name, "spamass")
        self.assertEqual(configuration.milter("other").command_options, "start --now")

    def test_milter_name_is_readable(self):
        """milter.name reads the name given to define_milter."""
        configuration = self.load("""\
            with define_milter("clamav") as milter:
                milter.connection_spec = "inet:1@[127.0.0.1]"
                milter.description = milter.name.upper()
            """)
        self.assertEqual(configuration.milters[0].description, "CLAMAV")


class ValueCheckTests(ConfigTestCase):
    """The new items' checks: each message exact, with FILE:LINE."""

    def test_ranges(self):
        """Counts refuse negative numbers, n_workers stops at 1000, suspend time at 1."""
        for name, value, expected in (
                ("n_workers", "1001", "an integer from 0 to 1000 (0 serves in this process)"),
                ("n_workers", "-1", "an integer from 0 to 1000 (0 serves in this process)"),
                ("max_connections", "-1", "an integer, 0 or more (0 is unlimited)"),
                ("max_file_descriptors", "1.0",
                 "an integer, 0 or more (0 keeps the system's)"),
                ("packet_buffer_size", "-5", "an integer, 0 or more (0 disables it)"),
                ("max_pending_finished_sessions", '"3"',
                 "an integer, 0 or more (0 cleans up only when idle)"),
                ("maintenance_interval", "-1", "an integer, 0 or more (0 disables it)"),
                ("suspend_time_on_unacceptable", "0", "an integer, 1 or more")):
            self.assertError(
                f"\n\nmanager.{name} = {value}\n", 3,
                f"manager.{name} must be {expected}; got {eval(value)!r}")

    def test_enumerations(self):
        """event_loop_backend, fallback_status_at_disconnect and syslog_facility are enumerations."""
        self.assertError(
            'manager.event_loop_backend = "epoll"\n', 1,
            "manager.event_loop_backend must be one of glib, libev; got 'epoll'")
        self.assertError(
            'manager.fallback_status_at_disconnect = "continue"\n', 1,
            f"manager.fallback_status_at_disconnect must be one of {STATUSES}; got 'continue'")

    def test_package(self):
        """platform names a file, so it cannot hold a path; options is NAME=VALUE pairs."""
        self.assertError(
            'package.platform = "../../tmp/x"\n', 1,
            "package.platform must be a platform name such as debian, redhat, freebsd or pkgsrc "
            "(letters, digits, '.', '_', '-'); got '../../tmp/x'")
        self.assertError(
            'package.options = "prefix"\n', 1,
            'package.options must be None or "NAME=VALUE,NAME=VALUE" (e.g. "prefix=/usr/pkg"); '
            "got 'prefix'")

    def test_privilege_mode(self):
        """privilege_mode takes booleans and the words true and false only."""
        self.assertError(
            'security.privilege_mode = "yes"\n', 1,
            'security.privilege_mode must be True or False (or "true", "false"); got \'yes\'')

    def test_controller_spec(self):
        """A bad controller.connection_spec is refused as the manager's is."""
        self.assertError(
            'controller.connection_spec = "inet:x"\n', 1,
            "controller.connection_spec: bad connection spec 'inet:x': port 'x' is not a number; "
            + config.model.connection_spec.EXPECTED)

    def test_command_options(self):
        """command_options is a string or a list of strings."""
        self.assertError(
            'with define_milter("a") as milter:\n    milter.command_options = ["-a", 1]\n'
            + SPEC, 2,
            'milter "a": command_options must be a string, a list of strings, or None '
            "(without NUL characters); got ['-a', 1]")


class RefusedTests(ConfigTestCase):
    """Upstream items that only made sense for Ruby are refused, saying why, with FILE:LINE."""

    def test_database(self):
        """Any database.* item, assigned or called, is refused."""
        reason = "milter-manager has no ActiveRecord; keep data in the child milters' own stores"
        self.assertError('\ndatabase.type = "sqlite3"\n', 2, f"database.type: {reason}")
        self.assertError("database.setup()\n", 1, f"database.setup: {reason}")
        self.assertError('x = database.name\n', 1, f"database.name: {reason}")

    def test_run_gc_on_maintain(self):
        """manager.run_gc_on_maintain has no garbage collector to run."""
        self.assertError(
            "manager.run_gc_on_maintain = True\n", 1,
            "manager.run_gc_on_maintain: there is no Ruby garbage collector to run; "
            "remove the line")

    def test_report_memory_profile(self):
        """manager.report_memory_profile (Ruby's) points at report_memory_statistics."""
        self.assertError(
            "\nmanager.report_memory_profile()\n", 2,
            "manager.report_memory_profile: Ruby's memory profile does not exist here; "
            "use manager.report_memory_statistics()")

    def test_define_policy(self):
        """define_policy, an undocumented upstream experiment, is refused."""
        self.assertError(
            'define_policy("x")\n', 1,
            "define_policy: upstream's undocumented policy experiment is not supported; "
            "use define_applicable_condition")


class HookTests(ConfigTestCase):
    """Functions registered on manager: connection checkers, maintained, event_loop_created."""

    def test_use_netstat_connection_checker(self):
        """use_netstat_connection_checker sets the interval (default 5) and the netstat checker."""
        path = self.write("milter-manager.conf", "manager.use_netstat_connection_checker()\n")
        manager = config.load(path).manager
        self.assertEqual(manager.connection_check_interval, 5.0)
        self.assertEqual(manager.origins["connection_check_interval"], f"{path}:1")
        self.assertEqual(manager.connection_checkers, {"netstat": config.Hook(
            "connection_checker", "netstat", builtin="netstat", arguments=(5,))})
        self.assertEqual(manager.connection_checkers["netstat"].origin, f"{path}:1")
        self.assertEqual(
            self.load("manager.use_netstat_connection_checker(30)\n")
            .manager.connection_check_interval, 30.0)

    def test_define_connection_checker(self):
        """define_connection_checker(name) decorates or takes the function; a name replaces."""
        path = self.write("milter-manager.conf", """\
            @manager.define_connection_checker("alive")
            def alive(context):
                return True

            def never(context):
                return False
            manager.define_connection_checker("dead", never)
            manager.define_connection_checker("alive", lambda context: False)
            """)
        checkers = config.load(path).manager.connection_checkers
        self.assertEqual(list(checkers), ["dead", "alive"])
        self.assertIs(checkers["dead"].function(None), False)
        self.assertEqual(checkers["dead"].origin, f"{path}:5")
        self.assertEqual(checkers["dead"].source, "def never(context):\n    return False\n")
        self.assertIs(checkers["alive"].function(None), False)
        self.assertIsNone(checkers["alive"].source)
        self.assertEqual(checkers["alive"].origin, f"{path}:8")

    def test_maintained_and_event_loop_created(self):
        """maintained and event_loop_created decorate functions, kept in order with their lines."""
        path = self.write("milter-manager.conf", """\
            calls = []

            @manager.maintained
            def first():
                calls.append(1)

            @manager.maintained
            def second():
                calls.append(2)

            @manager.event_loop_created
            def started(reactor):
                calls.append(reactor)
            manager.report_memory_statistics()
            """)
        manager = config.load(path).manager
        self.assertEqual([(hook.kind, hook.name, hook.origin) for hook in
                          manager.maintained_hooks + manager.event_loop_created_hooks],
                         [("maintained", "first", f"{path}:3"),
                          ("maintained", "second", f"{path}:7"),
                          ("event_loop_created", "started", f"{path}:11")])
        for hook in manager.maintained_hooks:
            hook.function()
        manager.event_loop_created_hooks[0].function("reactor")
        self.assertEqual(manager.maintained_hooks[0].function.__globals__["calls"],
                         [1, 2, "reactor"])
        self.assertIs(manager.report_memory_statistics, True)
        self.assertEqual(manager.origins["report_memory_statistics"], f"{path}:14")

    def test_wrong_arguments(self):
        """A hook that cannot take its arguments is refused where it is registered."""
        self.assertError(
            "\n@manager.maintained\ndef f(configuration):\n    pass\n", 2,
            "maintained hook f(configuration) must take no arguments")
        self.assertError(
            "manager.event_loop_created(print if False else 3)\n", 1,
            "event_loop_created hook must be a function; got 3")
        self.assertError(
            'manager.define_connection_checker("x", lambda: True)\n', 1,
            "connection checker 'x' <lambda>() must take (context)")
        self.assertError(
            "manager.define_connection_checker(None)\n", 1,
            "manager.define_connection_checker needs a name (a non-empty string); got None")


class ConditionTests(ConfigTestCase):
    """define_applicable_condition: description, stoppers, and the names milters use."""

    EVERY_STOPPER = EVERY_STOPPER

    def test_every_stopper(self):
        """Each stopper kind is kept, in order, with its function, FILE:LINE and source."""
        path = self.write("milter-manager.conf", self.EVERY_STOPPER)
        configuration = config.load(path)
        condition = configuration.conditions["Every Stage"]
        self.assertEqual(condition.description, "one stopper of each kind")
        self.assertEqual(condition.origins["name"], f"{path}:1")
        self.assertEqual([stopper.kind for stopper in condition.stoppers], list(config.STOPPERS))
        self.assertEqual([stopper.name for stopper in condition.stoppers], list(config.STOPPERS))
        self.assertEqual([stopper.origin for stopper in condition.stoppers],
                         [f"{path}:{line}" for line in range(3, 33, 3)])
        connect, = condition.stoppers_of("connect")
        self.assertIs(connect.function(None, "[192.0.2.1]", None), True)
        recipient, = condition.stoppers_of("envelope_recipient")
        self.assertEqual(recipient.source, (
            "def envelope_recipient(context, recipient):\n"
            '    return not recipient.lower().endswith("@example.com>")\n'))
        self.assertIs(recipient.function(None, "<a@example.com>"), False)

    def test_without_with(self):
        """A condition also works without `with`, and a stopper may be passed directly."""
        configuration = self.load("""\
            condition = define_applicable_condition("Late")
            condition.define_data_stopper(lambda context: True)
            """)
        data, = configuration.conditions["Late"].stoppers_of("data")
        self.assertIs(data.function(None), True)

    def test_redefinition_adds(self):
        """Defining a condition again adds to it, as redefining a milter merges."""
        configuration = self.load("""\
            with define_applicable_condition("A") as condition:
                condition.description = "first"
                condition.define_data_stopper(lambda context: True)
            define_applicable_condition("B")
            with define_applicable_condition("A") as condition:
                condition.define_data_stopper(lambda context: False)
            """)
        self.assertEqual(list(configuration.conditions), ["A", "B"])
        self.assertEqual(configuration.conditions["A"].description, "first")
        self.assertEqual(len(configuration.conditions["A"].stoppers), 2)

    def test_milters_name_conditions_defined_anywhere(self):
        """A milter may name a condition defined later, even in a later file."""
        self.write("applicable-conditions/late.conf", 'define_applicable_condition("Late")\n')
        configuration = self.load("""\
            with define_milter("a") as milter:
                milter.connection_spec = "inet:1@[127.0.0.1]"
                milter.applicable_conditions = ["Late"]
            load("applicable-conditions/*.conf")
            """)
        self.assertEqual(configuration.milters[0].applicable_conditions, ["Late"])
        self.assertIn("Late", configuration.conditions)

    def test_unknown_condition(self):
        """An unknown condition is reported at the line naming it, with the defined ones."""
        self.assertError(
            """\
            define_applicable_condition("Remote Network")
            define_applicable_condition("S25R")
            with define_milter("a") as milter:
                milter.connection_spec = "inet:1@[127.0.0.1]"

                milter.applicable_conditions = ["S25R", "Remote Netwrk"]
            """, 6,
            "milter \"a\": applicable_conditions: no condition 'Remote Netwrk'; did you mean "
            "'Remote Network'? defined: 'Remote Network', 'S25R'")

    def test_unknown_condition_added(self):
        """add_applicable_condition of an unknown condition names its own line."""
        self.assertError(
            """\
            with define_milter("a") as milter:
                milter.connection_spec = "inet:1@[127.0.0.1]"
                milter.add_applicable_condition("S25R")
            """, 3,
            "milter \"a\": applicable_conditions: no condition 'S25R'; no condition is defined")

    def test_condition_errors(self):
        """Misspelt verbs, bad descriptions, read-only names and wrong stopper arguments."""
        self.assertError(
            'with define_applicable_condition("A") as condition:\n'
            "    @condition.define_conect_stopper\n"
            "    def f(context, host, address):\n"
            "        return False\n", 2,
            "condition \"A\" has no setting 'define_conect_stopper'; did you mean "
            "define_connect_stopper? known: "
            + ", ".join(sorted(["description", "name", *(
                f"define_{kind}_stopper" for kind in config.STOPPERS)])))
        self.assertError(
            'with define_applicable_condition("A") as condition:\n'
            "    condition.description = 3\n", 2,
            'condition "A": description must be a non-empty string without NUL characters, '
            "or None; got 3")
        self.assertError(
            'define_applicable_condition("A").name = "B"\n', 1,
            'condition "A": name is read-only')
        self.assertError(
            'with define_applicable_condition("A") as condition:\n'
            "    @condition.define_body_stopper\n"
            "    def body(context, name, chunk):\n"
            "        return False\n", 2,
            'condition "A": body stopper body(context, name, chunk) must take (context, chunk)')
        self.assertError(
            "define_applicable_condition('')\n", 1,
            "define_applicable_condition needs a name (a non-empty string); got ''")


class LoadPathTests(ConfigTestCase):
    def test_load_default(self):
        """load_default loads defaults/PLATFORM.conf beside the file, if present."""
        self.write("defaults/debian.conf", "manager.chunk_size = 11\n")
        self.write("defaults/freebsd.conf", "manager.chunk_size = 12\n")
        self.assertEqual(self.load("load_default()\n").manager.chunk_size, 11)
        self.assertEqual(
            self.load('package.platform = "freebsd"\nload_default()\n').manager.chunk_size, 12)
        self.assertEqual(
            self.load('package.platform = "pkgsrc"\nload_default()\n'), config.default()
            .__class__(package=config.PackageConfig(platform="pkgsrc")))

    def test_load_paths(self):
        """A relative load() not found beside the file is looked up in the load paths."""
        other = os.path.join(self.directory, "other")
        self.write("other/defaults/debian.conf", "manager.chunk_size = 13\n")
        self.write("other/extra.conf", "manager.n_workers = 2\n")
        path = self.write("main/milter-manager.conf", 'load_default()\nload("extra.conf")\n')
        configuration = config.load(path, load_paths=[other])
        self.assertEqual(configuration.manager.chunk_size, 13)
        self.assertEqual(configuration.manager.n_workers, 2)
        self.assertEqual(configuration.files[-1], path)

    def test_load_paths_order(self):
        """config.load_paths: --config-dir, $MILTER_MANAGER_CONFIG_DIR, the default, the package's."""
        environ = {"MILTER_MANAGER_CONFIG_DIR": "/env"}
        # The tests run on this checkout, whose etc/ is the package's own copy.
        shipped = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc")
        self.assertEqual(config.load_paths("/dir", environ, "/etc/m"),
                         ["/dir", "/env", "/etc/m", shipped])
        self.assertEqual(config.load_paths(None, {}, "/etc/m"), ["/etc/m", shipped])
        self.assertEqual(config.load_paths("/etc/m", {}, "/etc/m"), ["/etc/m", shipped])


class SafetyTests(ConfigTestCase):
    """A file that others could change is code they could run as root: it is refused."""

    def assertRefused(self, path, message, **kwargs):
        error = self.assertRaises(ConfigurationError, config.load, path, **kwargs)
        self.assertEqual(str(error), message)
        return error

    def test_world_writable_file(self):
        """A world-writable file is refused, naming it and its mode."""
        path = self.write("milter-manager.conf", "")
        os.chmod(path, 0o666)
        self.assertRefused(
            path, f"{path}: refusing to load: mode 0666 lets others change code that runs as root")

    def test_group_writable_file(self):
        """A group-writable file is refused too."""
        path = self.write("milter-manager.conf", "")
        os.chmod(path, 0o620)
        self.assertRefused(
            path, f"{path}: refusing to load: mode 0620 lets others change code that runs as root")

    def test_writable_directory(self):
        """A file in a directory others may write to is refused, naming the directory."""
        path = self.write("conf/milter-manager.conf", "")
        directory = os.path.dirname(path)
        os.chmod(directory, 0o777)
        self.addCleanup(os.chmod, directory, 0o755)
        self.assertRefused(
            path, f"{directory}: refusing to load milter-manager.conf from it: mode 0777 lets "
                  "others change code that runs as root")

    def test_sticky_directory(self):
        """A sticky world-writable directory (/tmp) is refused: others could add a local file."""
        path = self.write("conf/milter-manager.conf", "")
        directory = os.path.dirname(path)
        os.chmod(directory, 0o1777)
        self.addCleanup(os.chmod, directory, 0o755)
        error = self.assertRaises(ConfigurationError, config.load, path)
        self.assertIn("mode 1777", str(error))

    def test_owned_by_another_user(self):
        """A file owned by a user other than root and us is refused."""
        path = self.write("milter-manager.conf", "")
        other = 0 if os.geteuid() != 0 else 65534
        try:
            os.chown(path, other, -1)
        except PermissionError:
            self.fail("cannot give a file away without root (CI runs as root)")
        import pwd
        try:
            owner = f"{pwd.getpwuid(other).pw_name} (uid {other})"
        except KeyError:
            owner = f"uid {other}"
        self.assertRefused(
            path, f"{path}: refusing to load: owned by {owner}, who could change code that "
                  "runs as root", )
        self.assertRaises(ConfigurationError, config.check_trusted, path, euid=12345)
        config.check_trusted(path, euid=other)

    def test_included_file(self):
        """An included file that others can change is refused at the including line."""
        included = self.write("applicable-conditions/a.conf", "")
        os.chmod(included, 0o646)
        path = self.write("milter-manager.conf", '\nload("applicable-conditions/*.conf")\n')
        self.assertRefused(
            path, f"{path}:2: {included}: refusing to load: mode 0646 lets others change code "
                  "that runs as root")

    def test_not_strict(self):
        """strict=False (for unusual test file systems) loads such a file anyway."""
        path = self.write("milter-manager.conf", "manager.chunk_size = 3\n")
        os.chmod(path, 0o666)
        self.assertEqual(config.load(path, strict=False).manager.chunk_size, 3)

    def test_trial_temporary_directories(self):
        """Files written under trial's temporary directories, as fixtures do, load."""
        directory = os.path.realpath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "milter-manager.conf")
        with open(path, "w") as file:
            file.write("manager.chunk_size = 2\n")
        self.assertEqual(config.load(path).manager.chunk_size, 2)


@dataclass
class _SecretSection:
    """A test-only section with a secret setting, like a later LDAP bind password."""

    SECTION: ClassVar[str] = "ldap"
    bind_password: str | None = setting(
        check=lambda value: _check_password(value), doc="password", secret=True)
    origins: dict = field(default_factory=dict, repr=False, compare=False)


def _check_password(value):
    if value is not None and not (isinstance(value, str) and len(value) >= 8):
        raise InvalidValue("must be a string of 8 characters or more")
    return value


class SecretTests(SynchronousTestCase):
    def test_dump_hides_secrets(self):
        """A secret setting is dumped as <hidden>, commented out so the dump still loads."""
        section = _SecretSection()
        set_value(section, "bind_password", "s3cr3t-pass", "x.conf:3")
        self.assertEqual(list(section_lines("ldap", section)),
                         ["# ldap.bind_password = <hidden>  # x.conf:3\n"])
        self.assertEqual(list(section_lines("ldap", _SecretSection())),
                         ["ldap.bind_password = None  # default\n"])

    def test_errors_hide_secrets(self):
        """An error about a secret setting does not show the value."""
        error = self.assertRaises(
            ConfigurationError, set_value, _SecretSection(), "bind_password", "short", "x:1")
        self.assertEqual(
            str(error), "x:1: ldap.bind_password must be a string of 8 characters or more; "
                        "got <hidden>")
        self.assertNotIn("short", str(error))


class ErrorLocationTests(ConfigTestCase):
    """Every kind of error names the file and line of the offending line and the value."""

    CASES = [
        ("unknown name", "manager.conection_spec = 'x'", "did you mean connection_spec?"),
        ("bad type", "manager.daemon = 'yes'", "got 'yes'"),
        ("bad enum", "log.syslog_facility = 'mial'", "got 'mial'"),
        ("bad spec", "manager.connection_spec = 'inet:70000'", "'inet:70000'"),
        ("syntax error", "manager.daemon = = True", "syntax error"),
        ("bad range", "manager.n_workers = 1001", "got 1001"),
        ("unknown condition",
         "with define_milter('a') as milter:\n"
         "    milter.connection_spec = 'inet:1@[127.0.0.1]'\n"
         "    milter.applicable_conditions = ['Nowhere']", "'Nowhere'"),
        ("refused", "database.type = 'mysql2'", "database.type: milter-manager has no"),
    ]

    def test_every_kind(self):
        """Unknown name, bad type, enum, spec, range, syntax, condition, refusal: FILE:LINE."""
        for kind, text, fragment in self.CASES:
            lines = text.count("\n") + 1
            included = self.write(f"{kind.replace(' ', '-')}.conf", "# first\n\n" + text + "\n")
            path = self.write("milter-manager.conf", f"\nload({os.path.basename(included)!r})\n")
            error = self.assertRaises(ConfigurationError, config.load, path)
            self.assertEqual(error.location, f"{included}:{lines + 2}", kind)
            self.assertTrue(str(error).startswith(f"{included}:{lines + 2}: "), kind)
            self.assertIn(fragment, error.reason, kind)


class ErrorCollectionTests(ConfigTestCase):
    """Loading goes on after an error in a value, as upstream, and reports every error."""

    def errors(self, path, **kwargs):
        """Load path; return the FILE:LINE of each error and the error raised."""
        error = self.assertRaises(ConfigurationError, config.load, path, **kwargs)
        return [each.location for each in error.errors], error

    def test_three_errors(self):
        """Three bad lines: three errors, each with its line, str() one per line."""
        path = self.write("milter-manager.conf", """\
            manager.chunk_size = 0
            log.syslog_facility = "mial"
            manager.conection_spec = "inet:10025"
            """)
        locations, error = self.errors(path)
        self.assertEqual(locations, [f"{path}:1", f"{path}:2", f"{path}:3"])
        lines = str(error).split("\n")
        self.assertEqual(lines, [str(each) for each in error.errors])
        self.assertTrue(lines[0].startswith(f"{path}:1: manager.chunk_size must be"))
        self.assertTrue(lines[1].startswith(f"{path}:2: log.syslog_facility must be"))
        self.assertTrue(lines[2].startswith(f"{path}:3: manager has no setting 'conection_spec'"))
        self.assertIsNone(error.location)
        self.assertEqual(error.reason, str(error))

    def test_every_kind_collected(self):
        """Each kind of value error is kept and loading goes on, across files, in order."""
        untrusted = self.write("untrusted.conf", "")
        os.chmod(untrusted, 0o666)
        self.write("included.conf", "manager.daemon = 'yes'\n")
        path = self.write("milter-manager.conf", """\
            manager.n_workers = 1001
            manager.connection_spec = "inet:70000"
            database.type = "mysql2"
            database.setup()
            manager.report_memory_profile()
            define_policy("x")
            load("included.conf")
            load("untrusted.conf")
            load("missing.conf")
            with define_milter("a") as milter:
                milter.conection_spec = "inet:1@[127.0.0.1]"
                milter.applicable_conditions = ["Nowhere"]
            with define_milter("b") as milter:
                milter.connection_spec = "inet:x"
            @manager.maintained
            def hook(argument):
                pass
            with define_milter(None) as milter:
                milter.connection_spec = "inet:1@[127.0.0.1]"
            manager.chunk_size = 0
            """)
        included = os.path.join(self.directory, "included.conf")
        locations, error = self.errors(path)
        self.assertEqual(locations, [
            *(f"{path}:{line}" for line in range(1, 7)), f"{included}:1",
            *(f"{path}:{line}" for line in (8, 9, 11, 14, 15, 18, 20)),
            # The whole configuration: "a" has no socket and names no condition. The
            # socket "b" was refused is not reported missing as well.
            f"{path}:10", f"{path}:12"])
        reasons = [each.reason for each in error.errors]
        self.assertIn("refusing to load", reasons[7])
        self.assertIn("No such file or directory", reasons[8])
        self.assertIn('milter "a": connection_spec is required', reasons[14])
        self.assertIn("no condition 'Nowhere'", reasons[15])

    def test_stopped_file(self):
        """A syntax error stops its whole file (none of it runs); the other files' errors stay."""
        self.write("broken.conf", "manager.daemon = 1\nmanager.chunk_size = = 1\n")
        path = self.write("milter-manager.conf", """\
            log.use_syslog = "no"
            load("broken.conf")
            manager.max_connections = -1
            """)
        broken = os.path.join(self.directory, "broken.conf")
        locations, error = self.errors(path)
        self.assertEqual(locations, [f"{path}:1", f"{broken}:2", f"{path}:3"])
        self.assertTrue(error.errors[1].reason.startswith("syntax error: "))

    def test_exception_stops_the_file(self):
        """An exception from the file's code stops it; its later lines do not run."""
        path = self.write("milter-manager.conf", """\
            manager.chunk_size = 0
            raise RuntimeError("no")
            manager.daemon = 1
            """)
        locations, error = self.errors(path)
        self.assertEqual(locations, [f"{path}:1", f"{path}:2"])
        self.assertEqual(error.errors[1].reason, "RuntimeError: no")

    def test_no_whole_configuration_checks_after_a_stop(self):
        """After a file stopped, no socket is said missing: the line setting it never ran."""
        path = self.write("milter-manager.conf", """\
            with define_milter("a") as milter:
                milter.command = 3
                1 / 0
                milter.connection_spec = "inet:1@[127.0.0.1]"
            """)
        locations, error = self.errors(path)
        self.assertEqual(locations, [f"{path}:2", f"{path}:3"])

    def test_refused_enabled_not_reported_missing(self):
        """A milter whose enabled = False was refused is not said to need a socket."""
        path = self.write("milter-manager.conf", 'define_milter("a").enabled = "no"\n')
        locations, error = self.errors(path)
        self.assertEqual(locations, [f"{path}:1"])

    def test_outside_loading_raises(self):
        """A hook of the file that assigns a bad value when run later raises at once."""
        configuration = self.load("""\
            @manager.maintained
            def hook():
                manager.chunk_size = 0
            """)
        error = self.assertRaises(
            ConfigurationError, configuration.manager.maintained_hooks[0].function)
        self.assertIn("manager.chunk_size must be", str(error))

    def test_of(self):
        """ConfigurationError.of: one error as it is; several as one, listing each."""
        one, two = ConfigurationError("x", "a:1"), ConfigurationError("y")
        self.assertIs(ConfigurationError.of([one]), one)
        self.assertEqual(one.errors, [one])
        both = ConfigurationError.of([one, two])
        self.assertEqual((str(both), both.errors, both.location), ("a:1: x\ny", [one, two], None))
