"""The recent activity the dashboard and the sessions page show (an event-stream observer)."""

from zope.interface import implementer

from ..events import ISessionObserver


@implementer(ISessionObserver)
class Activity:
    def __init__(self, clock):
        self.clock = clock

    def session_started(self, event):
        pass

    def child_replied(self, event):
        pass

    def child_stopped(self, event):
        pass

    def child_fell_back(self, event):
        pass

    def message_ended(self, event):
        pass

    def session_ended(self, event):
        pass

    def child_health_changed(self, event):
        pass
