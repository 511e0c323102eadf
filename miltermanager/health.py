"""Which children are down: failures to connect in a row, back-off, one probe at a time.

A child that cannot be reached costs every session its connection timeout
and one error line. After manager.down_after_failures failures in a row
(across sessions) it is marked down: sessions use its fallback_status at
once, without connecting. After manager.down_retry_interval seconds one
session probes it; a failed probe doubles the interval, up to
manager.max_down_retry_interval; a successful one brings it back. Each
change between up and down is logged once and told to the observers.
"""

import enum

from twisted.logger import Logger

from .events import ChildHealthChanged


class Admission(enum.Enum):
    """What a session may do with a child now."""

    CONNECT = "connect"  # up: connect as usual
    PROBE = "probe"  # down, and this session tries it once for everyone
    SKIP = "skip"  # down: use its fallback without connecting


class _Record:
    __slots__ = ("failures", "down_since", "interval", "retry_at", "probing")

    def __init__(self):
        self.failures = 0  # failed starts in a row
        self.down_since = None  # clock time it was marked down, None while up
        self.interval = 0.0  # current back-off
        self.retry_at = 0.0  # when the next probe may go
        self.probing = False  # a session is probing it now


class ChildHealth:
    """Failures in a row per child, process-wide (kept across reloads).

    A child is known by its name and connection spec: a reload that points
    a name elsewhere starts it afresh. settings() returns the current
    manager settings (down_after_failures, down_retry_interval,
    max_down_retry_interval, down_retry_limit); observer() the current
    observer or None. records: child -> its failures, only for children
    that failed since they last worked (empty while all is well).
    """

    log = Logger()

    def __init__(self, clock, settings, observer=lambda: None):
        self.clock = clock
        self.settings = settings
        self.observer = observer
        self.records = {}

    def _key(self, milter):
        return (milter.name, milter.connection_spec)

    def admit(self, milter):
        """Whether a session may connect to milter now: an Admission."""
        record = self.records.get(self._key(milter))
        if record is None or record.down_since is None:
            return Admission.CONNECT
        if record.probing or self.clock.seconds() < record.retry_at:
            return Admission.SKIP
        record.probing = True
        return Admission.PROBE

    def succeeded(self, milter):
        """milter started (connected and negotiated)."""
        key = self._key(milter)
        record = self.records.get(key)
        if record is None:
            return
        del self.records[key]
        if record.down_since is not None:
            down = self.clock.seconds() - record.down_since
            self.log.info("[children][up] {name}: reachable again after {down:.1f} s down",
                          name=milter.name, down=down)
            self._tell(ChildHealthChanged(milter.name, True, 0, f"down {down:.1f} s", None))

    def failed(self, milter, reason):
        """milter could not be reached (or negotiated with); reason says why, in words."""
        settings = self.settings()
        threshold = settings.down_after_failures
        if not threshold:
            return
        record = self.records.setdefault(self._key(milter), _Record())
        record.failures += 1
        now = self.clock.seconds()
        if record.down_since is not None:
            # A probe failed: wait twice as long before the next one.
            record.probing = False
            record.interval = min(record.interval * 2, settings.down_retry_limit)
            record.retry_at = now + record.interval
            self.log.debug("[children][down] {name}: probe failed ({reason}); next one in "
                           "{interval} s", name=milter.name, reason=reason,
                           interval=record.interval)
            return
        if record.failures < threshold:
            return
        record.down_since = now
        record.interval = settings.down_retry_interval
        record.retry_at = now + record.interval
        self.log.error(
            "[children][down] {name}: {failures} failures in a row (last: {reason}); "
            "sessions use its fallback without connecting, next try in {interval} s",
            name=milter.name, failures=record.failures, reason=reason,
            interval=record.interval)
        self._tell(ChildHealthChanged(milter.name, False, record.failures, reason,
                                      record.interval))

    def abandoned(self, milter):
        """A probe's session went away before the probe finished: another session may probe."""
        record = self.records.get(self._key(milter))
        if record is not None:
            record.probing = False

    def _tell(self, event):
        observer = self.observer()
        if observer is not None:
            observer.child_health_changed(event)
