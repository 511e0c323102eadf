"""Upstream settings that now do what they say: packet_buffer_size, report_memory_statistics,
use_netstat_connection_checker from a file, and max_pending_finished_sessions' warning."""

import os
import re

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from miltermanager import config
from miltermanager.factory import ManagerFactory, memory_statistics
from miltermanager.protocol import constants as c
from miltermanager.protocol import messages as m
from miltermanager.protocol.framing import FrameDecoder
from tests.test_server import Harness

BODY = bytes(range(256)) * 1000  # 256,000 bytes: four REPLACE_BODY packets
ANSWER = [m.ReplaceBody(BODY), m.AddHeader(b"X-Scanned", b"yes"), m.CONTINUE]


def _frames(data):
    return FrameDecoder(1 << 20).feed(data)


class PacketBufferSizeTests(SynchronousTestCase):
    """The MTA's end-of-message answer in writes of packet_buffer_size bytes or more."""

    def end_of_message(self, size, answer=ANSWER):
        """The writes the MTA gets for answer with packet_buffer_size size."""
        h = Harness(actions=c.SMFIF_CHGBODY | c.SMFIF_ADDHDRS)
        h.factory.packet_buffer_size = size
        h.negotiate()
        h.milter.answers["end_of_message"] = answer
        h.send(m.Mail(b"<a@example.net>"), m.END_OF_MESSAGE)
        writes = list(h.transport.writes)
        self.assertEqual(h.take(), b"".join(writes))
        return writes[1:]  # after MAIL's CONTINUE

    def test_zero_is_one_write(self):
        """0: the whole answer in one write."""
        (write,) = self.end_of_message(0)
        self.assertEqual([code for code, _ in _frames(write)],
                         [c.REPLACE_BODY] * 4 + [c.ADD_HEADER, c.CONTINUE])

    def test_writes_of_at_least_n_bytes(self):
        """N: every write but the last holds N bytes or more, whole packets, the same bytes."""
        whole = b"".join(self.end_of_message(0))
        for size in (100_000, 65_541, 150_000):
            writes = self.end_of_message(size)
            self.assertEqual(b"".join(writes), whole, size)
            self.assertGreater(len(writes), 1, size)
            self.assertTrue(all(len(write) >= size for write in writes[:-1]), size)
            for write in writes:  # whole packets: a 4-byte length, the code, the data
                self.assertEqual(sum(5 + len(data) for _, data in _frames(write)), len(write))
            self.assertEqual(_frames(writes[-1])[-1][0], c.CONTINUE)

    def test_one_byte_is_a_write_per_packet(self):
        """1: each packet is written as it is produced."""
        writes = self.end_of_message(1)
        self.assertEqual([len(_frames(write)) for write in writes], [1] * 6)

    def test_lone_final_reply(self):
        """A lone final reply is one write whatever N (the hot path is untouched)."""
        self.assertEqual(self.end_of_message(10, [m.REJECT]), [m.REJECT.encode()])


class MemoryStatisticsTests(SynchronousTestCase):
    """report_memory_statistics: one [maintain][memory] line per maintenance."""

    def factory(self, report):
        configuration = config.default()
        config.set_value(configuration.manager, "maintenance_interval", 2)
        config.set_value(configuration.manager, "report_memory_statistics", report)
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return ManagerFactory(configuration, MemoryReactorClock()), events

    def memory_lines(self, events):
        return [event for event in events
                if event.get("log_format", "").startswith("[maintain][memory]")]

    def test_line_at_each_maintenance(self):
        """Every 2 finished sessions, one statistics line in upstream's words, then peak and sessions."""
        made, events = self.factory(True)
        made.connection_made()
        for _ in range(4):
            made.connection_made()
            made.connection_lost()
        lines = self.memory_lines(events)
        self.assertEqual(len(lines), 2)
        self.assertEqual(lines[0]["milter_log_level"], "statistics")
        text = lines[0]["memory"]
        match = re.fullmatch(r"\((\d+)KB\) total:(\d+) Proc:(\d+) GLib::Object:\d+ "
                             r"VmHWM:(\d+)KB sessions:1", text)
        self.assertIsNotNone(match, text)
        rss, total, functions, peak = (int(figure) for figure in match.groups())
        self.assertTrue(1000 < rss <= peak, text)  # a Python with Twisted is megabytes
        self.assertTrue(1000 < functions < total, text)  # Twisted alone has thousands

    def test_off(self):
        """Without report_memory_statistics, maintenance logs no memory line."""
        made, events = self.factory(False)
        for _ in range(2):
            made.connection_made()
            made.connection_lost()
        self.assertEqual(self.memory_lines(events), [])

    def test_without_proc(self):
        """Where /proc/self/status cannot be read, the figures say so instead of failing."""
        self.assertRegex(memory_statistics(0, self.mktemp()),
                         r"^\(\?\) total:\d+ Proc:\d+ GLib::Object:\d+ VmHWM:\? sessions:0$")


class FromConfigurationTests(SynchronousTestCase):
    """What a configuration file says reaches the running factory."""

    def load(self, text):
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as file:
            file.write(text)
        return path, config.load(path)

    def test_netstat_checker_timer(self):
        """use_netstat_connection_checker(2): a 2 s timer while MTA connections are open."""
        _, configuration = self.load("manager.use_netstat_connection_checker(2)\n")
        clock = MemoryReactorClock()
        made = ManagerFactory(configuration, clock)
        self.assertEqual(clock.getDelayedCalls(), [])
        made.connection_made()
        made.connection_made()
        (call,) = clock.getDelayedCalls()
        self.assertEqual(call.getTime(), 2.0)
        made.connection_lost()
        made.connection_lost()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_reload_turns_checking_off(self):
        """A reload without checkers stops the timer at its next round."""
        _, configuration = self.load("manager.use_netstat_connection_checker(2)\n")
        clock = MemoryReactorClock()
        made = ManagerFactory(configuration, clock)
        made.connection_made()
        made.configuration = self.load("")[1]
        clock.advance(2)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_max_pending_finished_sessions_warns(self):
        """max_pending_finished_sessions is accepted with a warning saying why it does nothing."""
        path, configuration = self.load("\nmanager.max_pending_finished_sessions = 3\n")
        self.assertEqual(configuration.warnings, [
            f"{path}:2: manager.max_pending_finished_sessions = 3: accepted for upstream's "
            "files; a finished session is freed at once here, and maintenance runs every "
            "maintenance_interval finished sessions even under constant load, so nothing "
            "waits for a cleanup"])


class IdleSettingTests(SynchronousTestCase):
    """A setting the rest of the configuration leaves idle is a warning, not silence."""

    def warnings(self, text):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "milter-manager.conf")
        with open(path, "w") as file:
            file.write(text)
        configuration = config.load(path)
        from miltermanager.service import startup_problems

        self.assertEqual(startup_problems(configuration), [])
        return [warning.replace(path, "FILE") for warning in configuration.warnings]

    def test_interval_without_checker(self):
        self.assertEqual(self.warnings("manager.connection_check_interval = 5\n"), [
            "FILE:1: manager.connection_check_interval = 5.0: no connection checker is "
            "registered (manager.use_netstat_connection_checker() or "
            "@manager.define_connection_checker): nothing is checked"])

    def test_checker_without_interval(self):
        self.assertEqual(self.warnings(
            '@manager.define_connection_checker("here")\n'
            "def here(context):\n    return True\n"), [
            "connection checkers here never run: manager.connection_check_interval is 0"])

    def test_fallback_at_disconnect_without_checks(self):
        self.assertEqual(self.warnings('manager.fallback_status_at_disconnect = "reject"\n'), [
            "FILE:1: manager.fallback_status_at_disconnect = 'reject': no effect without "
            "connection checks (a connection checker and connection_check_interval > 0)"])

    def test_memory_report_without_maintenance(self):
        self.assertEqual(self.warnings(
            "manager.maintenance_interval = 0\nmanager.report_memory_statistics()\n"), [
            "FILE:2: manager.report_memory_statistics = True: never reported: "
            "manager.maintenance_interval is 0 (no maintenance)"])

    def test_privilege_mode_without_commands(self):
        self.assertEqual(self.warnings("security.privilege_mode = True\n"), [
            "FILE:1: security.privilege_mode = True: no enabled milter has a command: "
            "nothing is ever started"])

    def test_working_combinations_say_nothing(self):
        self.assertEqual(self.warnings(
            "manager.use_netstat_connection_checker(5)\n"
            'manager.fallback_status_at_disconnect = "reject"\n'
            "manager.report_memory_statistics()\n"), [])
