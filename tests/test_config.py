"""Tests for the configuration language: defaults, settings, checks, loading and dumping."""

import os
import textwrap

from twisted.trial.unittest import SynchronousTestCase

from miltermanager import client, config
from miltermanager.config import ConfigurationError
from miltermanager.merge import Status

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATUSES = "accept, temporary-failure, reject, discard"


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
                f'with define_milter("a") as milter:\n    milter.{name} = "yes"\n', 2,
                f"milter \"a\": {name} must be True or False; got 'yes'")

    def test_timeouts(self):
        """Timeouts are numbers of seconds greater than 0."""
        for name in ("connection_timeout", "writing_timeout", "reading_timeout",
                     "end_of_message_timeout"):
            for value in ("0", "-1", '"7"', "False", 'float("inf")'):
                self.assertError(
                    f'with define_milter("a") as milter:\n    milter.{name} = {value}\n', 2,
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
            "security.effective_user must be a non-empty string or None; got 0")
        self.assertError(
            'with define_milter("a") as milter:\n    milter.description = ""\n', 2,
            "milter \"a\": description must be a non-empty string or None; got ''")

    def test_applicable_conditions(self):
        """applicable_conditions is a list of names, not one string."""
        self.assertError(
            'with define_milter("a") as milter:\n'
            '    milter.applicable_conditions = "Remote Network"\n', 2,
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
            'with define_milter("a") as milter:\n    milter.name = "b"\n', 2,
            'milter "a": name is read-only')


class UnknownAttributeTests(ConfigTestCase):
    def test_unknown_milter_setting(self):
        """Assigning a misspelt milter setting fails, suggesting and listing the known ones."""
        self.assertError(
            """\
            with define_milter("a") as milter:
                milter.conection_spec = "inet:1@[127.0.0.1]"
            """, 2,
            "milter \"a\" has no setting 'conection_spec'; did you mean connection_spec? known: "
            "add_applicable_condition, applicable_conditions, command, command_options, "
            "connection_spec, connection_timeout, description, enabled, end_of_message_timeout, "
            "evaluation_mode, fallback_status, name, reading_timeout, user_name, writing_timeout")

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
            "remove_unix_socket_on_close, remove_unix_socket_on_create, unix_socket_group, "
            "unix_socket_mode")

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
        """A glob that matches nothing loads nothing, as upstream's applicable-conditions/*.conf."""
        self.assertEqual(self.load('load("applicable-conditions/*.conf")\n'), config.default())

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


class ShippedFilesTests(SynchronousTestCase):
    def test_milter_manager_conf(self):
        """etc/milter-manager.conf loads to the defaults."""
        configuration = config.load(os.path.join(ROOT, "etc", "milter-manager.conf"))
        self.assertEqual(configuration, config.default())

    def test_milter_manager_conf_defaults_are_true(self):
        """The commented defaults in etc/milter-manager.conf are the real defaults."""
        path = os.path.join(ROOT, "etc", "milter-manager.conf")
        with open(path, encoding="utf-8") as file:
            lines = [line[2:] for line in file
                     if line.startswith(("# manager.", "# security.", "# log.", "#     milter."))]
        source = "with define_milter('x') as milter:\n" + "".join(
            line if line.startswith("    milter.") else "    " + line for line in lines)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        uncommented = os.path.join(directory, "uncommented.conf")
        with open(uncommented, "w", encoding="utf-8") as file:
            file.write(source)
        configuration = config.load(uncommented)
        expected = config.default()
        expected.milters.append(config.MilterConfig("x", "inet:8891@[127.0.0.1]"))
        self.assertEqual(configuration, expected)
        every = sum(len(config.settings_of(section)) for section in (
            expected.manager, expected.security, expected.log, expected.milters[0]))
        self.assertEqual(len(lines), every, "each setting is shown once")

    def test_postfix_two_children(self):
        """The Postfix example defines a libmilter child and opendkim, which tempfails when down."""
        configuration = config.load(
            os.path.join(ROOT, "etc", "examples", "postfix-two-children.conf"))
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
