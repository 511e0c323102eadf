"""Stoppers of applicable conditions: when they run, what they get, what stopping does.

The scenarios run on tests.test_session's harness (an MTA, the manager and
scripted children on loopback); conditions are plain Python functions
registered as the configuration language would.
"""

import ipaddress

from twisted.internet import defer, error, reactor
from twisted.trial import unittest

from miltermanager.conditions.context import SocketAddress, macro_name
from miltermanager.config import ConditionConfig, Hook
from miltermanager.merge import Status
from miltermanager.protocol import constants as c
from miltermanager.protocol.messages import (
    ACCEPT, CONTINUE, DATA, REJECT, Body, Connect, Mail,
)
from tests import test_session
from tests.test_session import (
    BODY, CONNECT, EOH, EOM, FROM, FULL_OFFER, HELO, MAIL, RCPT, RCPT2, SLOW, SUBJECT, Hang, Kid,
    Scenario, ScenarioTestCase,
)

ALL_SEEN = "connect helo mail rcpt data header eoh body eom close"
TWO_HEADERS = [CONNECT, HELO, MAIL, RCPT, DATA, SUBJECT, FROM, EOH, BODY, EOM]
TWO_HEADERS_SEEN = "connect helo mail rcpt data header header eoh body eom close"
MAIL2 = Mail(b"<other@example.net>")


def _steps(commands, **replies):
    """(command, CONTINUE) for each command, but the replies given by command name."""
    return [(command, replies.get(type(command).__name__.lower(), CONTINUE))
            for command in commands]


def _hooks(stoppers):
    """{kind: function or [functions]} -> the Hooks a configuration file would register."""
    hooks = []
    for kind, functions in stoppers.items():
        if not isinstance(functions, (list, tuple)):
            functions = [functions]
        for function in functions:
            hooks.append(Hook(kind, getattr(function, "__name__", "stopper"), function,
                              getattr(function, "origin", None)))
    return hooks


class StopperTestCase(ScenarioTestCase):
    """run_stopping: a Scenario whose children apply conditions made of stopper functions."""

    def run_stopping(self, scenario, conditions, applies):
        """conditions: name -> {kind: function(s)}; applies: child name -> condition names.

        self.clock is the scenario's fake clock, self.factory the manager's
        factory and self.sessions the ManagerSessions made, once it runs.
        """
        def configure(configuration):
            configuration.conditions = {
                name: ConditionConfig(name, stoppers=_hooks(stoppers))
                for name, stoppers in conditions.items()}
            for milter in configuration.milters:
                milter.applicable_conditions = list(applies.get(milter.name, ()))

        self.configure = configure
        return self.run_scenario(scenario)


def _always(*arguments):
    return True


def _events(events, name):
    return [event for event in events if event.name == name]


# ---------------------------------------------------------------- stop semantics per stage


class ConnectionStopTests(StopperTestCase):
    """connect and HELO stoppers: the child is quit for the SMTP connection."""

    def test_connect_stopper_quits_child(self):
        """A connect stopper's child never gets CONNECT and is quit; the other child goes on."""
        return self.run_stopping(Scenario(
            children=[Kid("one"), Kid("two")],
            steps=_steps([CONNECT, HELO, MAIL, RCPT, DATA, SUBJECT, EOH, BODY, EOM]),
            seen={"one": "close", "two": ALL_SEEN},
            aborted=(),
        ), {"stop": {"connect": _always}}, {"one": ["stop"]})

    def test_lone_child_stopped_at_connect_accepts(self):
        """A lone child stopped at connect counts as accept: the MTA gets ACCEPT."""
        return self.run_stopping(Scenario(
            children=[Kid("one")],
            steps=[(CONNECT, ACCEPT)],
            seen={"one": "close"},
        ), {"stop": {"connect": _always}}, {"one": ["stop"]})

    def test_helo_stopper_quits_child(self):
        """A HELO stopper's child saw CONNECT only; it gets no HELO and no message."""
        return self.run_stopping(Scenario(
            children=[Kid("one"), Kid("two")],
            steps=_steps([CONNECT, HELO, MAIL, RCPT, DATA, SUBJECT, EOH, BODY, EOM]),
            seen={"one": "connect close", "two": ALL_SEEN},
            aborted=(),
        ), {"stop": {"helo": _always}}, {"one": ["stop"]})

    @defer.inlineCallbacks
    def test_connect_arguments(self):
        """The connect stopper gets the host as the MTA sent it and a SocketAddress."""
        calls = []

        def record(context, host, address):
            calls.append((context.name, host, str(address), address.ipv4, address.port,
                          context.socket_address is address, context.host))

        yield self.run_stopping(Scenario(
            children=[Kid("one")],
            steps=_steps([Connect(b"[192.0.2.10]", c.FAMILY_INET, 52258, b"192.0.2.10")]),
        ), {"record": {"connect": record}}, {"one": ["record"]})
        self.assertEqual(calls, [("one", "[192.0.2.10]", "inet:52258@[192.0.2.10]", True,
                                  52258, True, "[192.0.2.10]")])

    @defer.inlineCallbacks
    def test_helo_argument(self):
        """The HELO stopper gets the name the client gave; context.helo has it after."""
        calls = []

        def record(context, fqdn):
            calls.append((fqdn, context.helo))

        yield self.run_stopping(Scenario(
            children=[Kid("one")], steps=_steps([CONNECT, HELO]),
        ), {"record": {"helo": record}}, {"one": ["record"]})
        self.assertEqual(calls, [("client.example.net", "client.example.net")])


class TransactionStopTests(StopperTestCase):
    """envelope_from stoppers: the child sits out this transaction only."""

    def test_envelope_from_stopper_skips_transaction(self):
        """Stopped at the first MAIL, the child gets nothing of that message but the next one."""
        def first_sender(context, sender):
            return sender == "<sender@example.net>"

        return self.run_stopping(Scenario(
            children=[Kid("one"), Kid("two")],
            steps=_steps([CONNECT, HELO, MAIL, RCPT, DATA, SUBJECT, EOH, BODY, EOM,
                          MAIL2, RCPT, DATA, SUBJECT, EOH, BODY, EOM]),
            seen={"one": "connect helo mail rcpt data header eoh body eom close",
                  "two": "connect helo mail rcpt data header eoh body eom "
                         "mail rcpt data header eoh body eom close"},
            aborted=(),
        ), {"first": {"envelope_from": first_sender}}, {"one": ["first"]})

    def test_lone_child_stopped_at_mail_accepts(self):
        """A lone child stopped at MAIL: the MTA gets ACCEPT for the MAIL."""
        return self.run_stopping(Scenario(
            children=[Kid("one")],
            steps=[(CONNECT, CONTINUE), (HELO, CONTINUE), (MAIL, ACCEPT)],
            seen={"one": "connect helo close"},
        ), {"stop": {"envelope_from": _always}}, {"one": ["stop"]})


class RecipientStopTests(StopperTestCase):
    """envelope_recipient stoppers: only that recipient is withheld from the child."""

    @defer.inlineCallbacks
    def test_recipient_withheld(self):
        """Bob is stopped for child one: it never sees bob but gets alice and the message."""
        def bob(context, recipient):
            return recipient == "<bob@example.org>"

        events = yield self.run_stopping(Scenario(
            children=[Kid("one"), Kid("two")],
            steps=_steps([CONNECT, HELO, MAIL, RCPT2, RCPT, DATA, SUBJECT, EOH, BODY, EOM]),
            seen={"one": ALL_SEEN,
                  "two": "connect helo mail rcpt rcpt data header eoh body eom close"},
            aborted=(),
        ), {"bob": {"envelope_recipient": bob}}, {"one": ["bob"]})
        self.assertEqual([event.command.recipient for event in _events(events["one"], "rcpt")],
                         [b"<alice@example.org>"])

    def test_every_recipient_stopped_aborts_at_data(self):
        """A child whose every recipient was stopped is aborted at DATA; the other goes on."""
        return self.run_stopping(Scenario(
            children=[Kid("one"), Kid("two")],
            steps=_steps([CONNECT, HELO, MAIL, RCPT, RCPT2, DATA, SUBJECT, EOH, BODY, EOM]),
            seen={"one": "connect helo mail abort close",
                  "two": "connect helo mail rcpt rcpt data header eoh body eom close"},
            aborted=("one",),
        ), {"stop": {"envelope_recipient": _always}}, {"one": ["stop"]})

    def test_lone_child_stopped_recipient_has_no_verdict(self):
        """A lone child's stopped RCPT gives no verdict: the MTA gets CONTINUE."""
        return self.run_stopping(Scenario(
            children=[Kid("one")],
            steps=[(CONNECT, CONTINUE), (HELO, CONTINUE), (MAIL, CONTINUE), (RCPT, CONTINUE)],
            seen={"one": "connect helo mail abort close"},
        ), {"stop": {"envelope_recipient": _always}}, {"one": ["stop"]})


class DataStopTests(StopperTestCase):
    """envelope and data stoppers run at DATA; stopping aborts the child."""

    @defer.inlineCallbacks
    def test_envelope_stopper_gets_accepted_recipients_once(self):
        """The envelope stopper runs once at DATA with the sender and the recipients kept."""
        calls = []

        def envelope(context, sender, recipients):
            calls.append(("envelope", context.name, sender, recipients))

        def data(context):
            calls.append(("data", context.name))

        def reject_bob(command, macros):
            return REJECT if command.recipient == RCPT2.recipient else CONTINUE

        def stop_carol(context, recipient):
            return recipient == "<carol@example.org>"

        yield self.run_stopping(Scenario(
            children=[Kid("one", replies={"rcpt": reject_bob}), Kid("two")],
            steps=_steps([CONNECT, HELO, MAIL, RCPT]) + [(RCPT2, REJECT)]
            + _steps([test_session.Rcpt(b"<carol@example.org>"), DATA, SUBJECT, EOH, BODY, EOM]),
        ), {"look": {"envelope": envelope, "data": data, "envelope_recipient": stop_carol}},
            {"one": ["look"], "two": ["look"]})
        self.assertEqual(calls, [
            ("envelope", "one", "<sender@example.net>", ["<alice@example.org>"]),
            ("data", "one"),
            ("envelope", "two", "<sender@example.net>",
             ["<alice@example.org>", "<bob@example.org>"]),
            ("data", "two"),
        ])

    def test_envelope_stopper_aborts_child(self):
        """An envelope stopper's child gets no DATA: it is aborted, the other goes on."""
        return self.run_stopping(Scenario(
            children=[Kid("one"), Kid("two")],
            steps=_steps([CONNECT, HELO, MAIL, RCPT, DATA, SUBJECT, EOH, BODY, EOM]),
            seen={"one": "connect helo mail rcpt abort close", "two": ALL_SEEN},
            aborted=("one",),
        ), {"stop": {"envelope": _always}}, {"one": ["stop"]})

    def test_data_stopper_aborts_child(self):
        """A data stopper's child gets no DATA: it is aborted, the other goes on."""
        return self.run_stopping(Scenario(
            children=[Kid("one"), Kid("two")],
            steps=_steps([CONNECT, HELO, MAIL, RCPT, DATA, SUBJECT, EOH, BODY, EOM]),
            seen={"one": "connect helo mail rcpt abort close", "two": ALL_SEEN},
            aborted=("one",),
        ), {"stop": {"data": _always}}, {"one": ["stop"]})

    def test_lone_child_stopped_at_data_accepts(self):
        """A lone child stopped at DATA: the MTA gets ACCEPT for DATA."""
        return self.run_stopping(Scenario(
            children=[Kid("one")],
            steps=[(CONNECT, CONTINUE), (HELO, CONTINUE), (MAIL, CONTINUE), (RCPT, CONTINUE),
                   (DATA, ACCEPT)],
            seen={"one": "connect helo mail rcpt abort close"},
            aborted=("one",),
        ), {"stop": {"data": _always}}, {"one": ["stop"]})


class MessageStopTests(StopperTestCase):
    """header, end_of_header, body and end_of_message stoppers: aborted, the message goes on."""

    @defer.inlineCallbacks
    def test_header_stopper_on_live_child(self):
        """The live child stopped at its second header is aborted; the next gets the replay."""
        calls = []

        def at_from(context, name, value):
            calls.append((name, value))
            return name == "From"

        yield self.run_stopping(Scenario(
            children=[Kid("one"), Kid("two")],
            steps=_steps(TWO_HEADERS),
            seen={"one": "connect helo mail rcpt data header abort close",
                  "two": TWO_HEADERS_SEEN},
            aborted=("one",),
            headers_seen={"two": [(b"Subject", b"hello"), (b"From", b"sender@example.net")]},
            body_seen={"two": BODY.chunk},
        ), {"from": {"header": at_from}}, {"one": ["from"]})
        self.assertEqual(calls, [("Subject", "hello"), ("From", "sender@example.net")])

    def test_header_stopper_in_replay(self):
        """The second child stopped at its replay's second header is aborted; it gives no verdict."""
        def at_from(context, name, value):
            return name == "From"

        return self.run_stopping(Scenario(
            children=[Kid("one"), Kid("two", replies={"end_of_message": REJECT})],
            steps=_steps(TWO_HEADERS),
            seen={"one": TWO_HEADERS_SEEN,
                  "two": "connect helo mail rcpt data header abort close"},
            aborted=("two",),
            headers_seen={"two": [(b"Subject", b"hello")]},
        ), {"from": {"header": at_from}}, {"two": ["from"]})

    def test_lone_live_child_stopped_at_header_accepts(self):
        """A lone child stopped at a header: the MTA gets ACCEPT for that header."""
        return self.run_stopping(Scenario(
            children=[Kid("one")],
            steps=_steps([CONNECT, HELO, MAIL, RCPT, DATA]) + [(SUBJECT, ACCEPT)],
            seen={"one": "connect helo mail rcpt data abort close"},
            aborted=("one",),
        ), {"stop": {"header": _always}}, {"one": ["stop"]})

    def test_end_of_header_stopper(self):
        """An end_of_header stopper: the live child saw the headers, not EOH; the next gets all."""
        return self.run_stopping(Scenario(
            children=[Kid("one"), Kid("two")],
            steps=_steps([CONNECT, HELO, MAIL, RCPT, DATA, SUBJECT, EOH, BODY, EOM]),
            seen={"one": "connect helo mail rcpt data header abort close", "two": ALL_SEEN},
            aborted=("one",),
        ), {"stop": {"end_of_header": _always}}, {"one": ["stop"]})

    @defer.inlineCallbacks
    def test_body_stopper_gets_bytes(self):
        """A body stopper gets each chunk as bytes; stopping at the second one aborts the child."""
        chunks = []

        def second(context, chunk):
            chunks.append(chunk)
            return len(chunks) == 2

        yield self.run_stopping(Scenario(
            children=[Kid("one"), Kid("two")],
            steps=_steps([CONNECT, HELO, MAIL, RCPT, DATA, SUBJECT, EOH, BODY, Body(b"more\r\n"),
                          EOM]),
            seen={"one": "connect helo mail rcpt data header eoh body abort close",
                  "two": "connect helo mail rcpt data header eoh body eom close"},
            aborted=("one",),
            body_seen={"two": BODY.chunk + b"more\r\n"},
        ), {"second": {"body": second}}, {"one": ["second"]})
        self.assertEqual(chunks, [BODY.chunk, b"more\r\n"])
        self.assertIs(type(chunks[0]), bytes)

    def test_body_stopper_when_the_mta_reads_no_reply_to_the_body(self):
        """The lone child takes no reply to the body, so neither does the MTA: its stop at the
        body is an accept the MTA gets at the end of message, not the manager's fallback."""
        return self.run_stopping(Scenario(
            children=[Kid("one", protocol=c.SMFIP_NR_BODY)],
            offer=FULL_OFFER,
            fallback=Status.REJECT,
            steps=_steps([CONNECT, HELO, MAIL, RCPT, DATA]) + [
                (SUBJECT, None), (EOH, None), (BODY, None), (EOM, ACCEPT)],
            seen={"one": "connect helo mail rcpt data header eoh abort close"},
            aborted=("one",),
        ), {"stop": {"body": _always}}, {"one": ["stop"]})

    def test_end_of_message_stopper_on_live_child(self):
        """The live child stopped at end of message is aborted; the next child's verdict is the MTA's."""
        return self.run_stopping(Scenario(
            children=[Kid("one", replies={"end_of_message": REJECT}),
                      Kid("two", replies={"end_of_message": ACCEPT})],
            steps=_steps([CONNECT, HELO, MAIL, RCPT, DATA, SUBJECT, EOH, BODY]) + [(EOM, ACCEPT)],
            seen={"one": "connect helo mail rcpt data header eoh body abort close",
                  "two": ALL_SEEN},
            aborted=("one",),
        ), {"stop": {"end_of_message": _always}}, {"one": ["stop"]})

    def test_end_of_message_stopper_in_replay(self):
        """The second child stopped before its end of message: aborted, the first's edits stand."""
        return self.run_stopping(Scenario(
            children=[Kid("one"), Kid("two", replies={"end_of_message": REJECT})],
            steps=_steps([CONNECT, HELO, MAIL, RCPT, DATA, SUBJECT, EOH, BODY, EOM]),
            seen={"one": ALL_SEEN,
                  "two": "connect helo mail rcpt data header eoh body abort close"},
            aborted=("two",),
        ), {"stop": {"end_of_message": _always}}, {"two": ["stop"]})

    def test_every_child_stopped_in_message(self):
        """Both children stopped at end of message: the MTA gets ACCEPT."""
        return self.run_stopping(Scenario(
            children=[Kid("one"), Kid("two")],
            steps=_steps([CONNECT, HELO, MAIL, RCPT, DATA, SUBJECT, EOH, BODY]) + [(EOM, ACCEPT)],
            aborted=("one", "two"),
        ), {"stop": {"end_of_message": _always}}, {"one": ["stop"], "two": ["stop"]})


# ---------------------------------------------------------------- the context


class ContextTests(StopperTestCase):
    """What ChildContext tells a stopper, and the macros it sets."""

    @defer.inlineCallbacks
    def test_macro_lookup_with_and_without_braces(self):
        """context["j"], ["{j}"], ["daemon_name"], ["{daemon_name}"] find the MTA's macros."""
        seen = []

        def look(context, host, address):
            seen.append([context[name] for name in (
                "j", "{j}", "daemon_name", "{daemon_name}", "if_name", "missing")])
            seen.append((context.get("missing", "default"), "j" in context, "nope" in context))

        yield self.run_stopping(Scenario(
            children=[Kid("one")],
            steps=[test_session.Send(CONNECT, CONTINUE, macros={
                b"j": b"mx.example.org", b"{daemon_name}": b"smtpd",
                b"{if_name}": b"caf\xe9"})],
        ), {"look": {"connect": look}}, {"one": ["look"]})
        self.assertEqual(seen, [
            ["mx.example.org", "mx.example.org", "smtpd", "smtpd", "caf\udce9", None],
            ("default", True, False)])

    @defer.inlineCallbacks
    def test_macros_as_they_stand(self):
        """A later stage's stopper sees that stage's macros and the earlier ones."""
        seen = []

        def look(context, recipient):
            seen.append((context["j"], context["i"], context["rcpt_addr"]))

        yield self.run_stopping(Scenario(
            children=[Kid("one")],
            steps=[test_session.Send(CONNECT, CONTINUE, macros={b"j": b"mx"}),
                   (HELO, CONTINUE),
                   test_session.Send(MAIL, CONTINUE, macros={b"i": b"ABC123"}),
                   test_session.Send(RCPT, CONTINUE, macros={b"{rcpt_addr}": b"alice"})],
        ), {"look": {"envelope_recipient": look}}, {"one": ["look"]})
        self.assertEqual(seen, [("mx", "ABC123", "alice")])

    def test_set_macro_reaches_that_child_only(self):
        """A connect stopper's macro goes with CONNECT and later commands to its child only."""
        def stress(context, host, address):
            context["stress"] = "yes"
            context["{b}"] = b"bytes"

        return self.run_stopping(Scenario(
            children=[Kid("one"), Kid("two")],
            steps=[test_session.Send(CONNECT, CONTINUE, macros={b"j": b"mx"}), (HELO, CONTINUE)],
            macros_seen={
                "one": {"connect": {b"j": b"mx", b"{stress}": b"yes", b"b": b"bytes"},
                        "helo": {b"{stress}": b"yes", b"b": b"bytes"}},
                "two": {"connect": {b"j": b"mx"}, "helo": {}}},
        ), {"stress": {"connect": stress}}, {"one": ["stress"]})

    @defer.inlineCallbacks
    def test_set_macro_seen_by_later_stoppers(self):
        """A macro a stopper set is what context[name] gives that child's stoppers afterwards."""
        seen = []

        def set_it(context, host, address):
            context["j"] = "overridden"

        def get_it(context, fqdn):
            seen.append((context.name, context["j"]))

        yield self.run_stopping(Scenario(
            children=[Kid("one"), Kid("two")],
            steps=[test_session.Send(CONNECT, CONTINUE, macros={b"j": b"mx"}), (HELO, CONTINUE)],
        ), {"set": {"connect": set_it}, "get": {"helo": get_it}},
            {"one": ["set", "get"], "two": ["get"]})
        self.assertEqual(seen, [("one", "overridden"), ("two", "mx")])

    def test_transaction_macro_forgotten_at_next_mail(self):
        """A macro set at MAIL goes with that transaction's commands, not the next one's."""
        def dummy_id(context, sender):
            if context["i"] is None and sender == "<sender@example.net>":
                context["i"] = "dummy-id"

        return self.run_stopping(Scenario(
            children=[Kid("one")],
            steps=_steps([CONNECT, HELO, MAIL, RCPT, DATA, SUBJECT, EOH, BODY, EOM])
            + [test_session.Send(MAIL2, CONTINUE, macros={b"{mail_addr}": b"other"}),
               (RCPT, CONTINUE)],
            macros_seen={"one": {"mail": {b"{mail_addr}": b"other"}, "rcpt": {}}},
        ), {"id": {"envelope_from": dummy_id}}, {"one": ["id"]})

    @defer.inlineCallbacks
    def test_transaction_macro_sent_in_its_transaction(self):
        """A macro set at MAIL goes with the MAIL and the RCPT of that transaction."""
        def dummy_id(context, sender):
            context["i"] = "dummy-id"

        events = yield self.run_stopping(Scenario(
            children=[Kid("one")],
            steps=_steps([CONNECT, HELO, MAIL, RCPT]),
            macros_seen={"one": {"helo": {}, "mail": {b"i": b"dummy-id"},
                                 "rcpt": {b"i": b"dummy-id"}}},
        ), {"id": {"envelope_from": dummy_id}}, {"one": ["id"]})
        self.assertTrue(events)

    def test_other_childs_reject_stops(self):
        """Child two's data stopper stops it because child one rejected the last recipient."""
        def after_reject(context):
            return context.children["one"].reject

        def reject_bob(command, macros):
            return REJECT if command.recipient == RCPT2.recipient else CONTINUE

        return self.run_stopping(Scenario(
            children=[Kid("one", replies={"rcpt": reject_bob}), Kid("two")],
            steps=_steps([CONNECT, HELO, MAIL, RCPT]) + [(RCPT2, REJECT)]
            + _steps([DATA, SUBJECT, EOH, BODY, EOM]),
            seen={"one": "connect helo mail rcpt rcpt data header eoh body eom close",
                  "two": "connect helo mail rcpt rcpt abort close"},
            aborted=("two",),
        ), {"after": {"data": after_reject}}, {"two": ["after"]})

    @defer.inlineCallbacks
    def test_children_statuses(self):
        """children[...] shows each child's last verdict, stopped and quitted."""
        views = []

        def look(context):
            views.append({name: (view.reject, view.temporary_failure, view.accept, view.discard,
                                 view.stopped, view.quitted, view.status)
                          for name, view in context.children.items()})

        yield self.run_stopping(Scenario(
            children=[Kid("quits", replies={"helo": ACCEPT}),
                      Kid("stopped"),
                      Kid("tempfails", replies={"rcpt": test_session.TEMPFAIL},
                          evaluation=True),
                      Kid("looks"), Kid("down", down=True)],
            steps=_steps([CONNECT, HELO, MAIL, RCPT, RCPT2, DATA]),
        ), {"stop": {"envelope_from": _always}, "look": {"data": look}},
            {"stopped": ["stop"], "looks": ["look"]})
        F, T = False, True
        self.assertEqual(views, [{
            "quits": (F, F, T, F, F, T, Status.ACCEPT),
            "stopped": (F, F, F, F, T, F, Status.NOT_CHANGE),
            "tempfails": (F, T, F, F, F, F, Status.TEMPORARY_FAILURE),
            "looks": (F, F, F, F, F, F, Status.CONTINUE),
            "down": (F, F, F, F, F, T, Status.NOT_CHANGE),
        }])

    @defer.inlineCallbacks
    def test_stopped_status_is_per_transaction(self):
        """A child stopped at one MAIL no longer shows as stopped in the next transaction."""
        views = []

        def first_sender(context, sender):
            return sender == "<sender@example.net>"

        def look(context, recipient):
            views.append(context.children["one"].stopped)

        yield self.run_stopping(Scenario(
            children=[Kid("one"), Kid("two")],
            steps=_steps([CONNECT, HELO, MAIL, RCPT, DATA, SUBJECT, EOH, BODY, EOM,
                          MAIL2, RCPT]),
        ), {"first": {"envelope_from": first_sender}, "look": {"envelope_recipient": look}},
            {"one": ["first"], "two": ["look"]})
        self.assertEqual(views, [True, False])

    @defer.inlineCallbacks
    def test_postfix_and_authenticated(self):
        """postfix follows the v macro; authenticated follows {auth_type} or {auth_authen}."""
        seen = []

        def look(context, sender):
            seen.append((context.postfix, context.authenticated))

        yield self.run_stopping(Scenario(
            children=[Kid("one")],
            steps=[test_session.Send(CONNECT, CONTINUE, macros={b"v": b"Postfix 3.7.11"}),
                   (HELO, CONTINUE),
                   (MAIL, CONTINUE),
                   test_session.Send(MAIL2, CONTINUE, macros={b"{auth_authen}": b"alice"}),
                   test_session.Send(MAIL, CONTINUE, macros={b"{auth_type}": b"PLAIN"})],
        ), {"look": {"envelope_from": look}}, {"one": ["look"]})
        self.assertEqual(seen, [(True, False), (True, True), (True, True)])

    @defer.inlineCallbacks
    def test_not_postfix(self):
        """Sendmail's v macro is not Postfix; no v macro neither."""
        seen = []

        def look(context, host, address):
            seen.append(context.postfix)

        yield self.run_stopping(Scenario(
            children=[Kid("one")],
            steps=[test_session.Send(CONNECT, CONTINUE, macros={b"v": b"8.17.1"})],
        ), {"look": {"connect": look}}, {"one": ["look"]})
        self.assertEqual(seen, [False])

    @defer.inlineCallbacks
    def test_mail_transaction_shelf(self):
        """The shelf is shared by the children's stoppers and new at each MAIL."""
        seen = []

        def write(context, sender):
            seen.append(("write", dict(context.mail_transaction_shelf)))
            context.mail_transaction_shelf["sender"] = sender

        def read(context, sender):
            seen.append(("read", dict(context.mail_transaction_shelf)))

        yield self.run_stopping(Scenario(
            children=[Kid("one"), Kid("two")],
            steps=_steps([CONNECT, HELO, MAIL, RCPT, DATA, SUBJECT, EOH, BODY, EOM, MAIL2]),
        ), {"write": {"envelope_from": write}, "read": {"envelope_from": read}},
            {"one": ["write"], "two": ["read"]})
        self.assertEqual(seen, [
            ("write", {}), ("read", {"sender": "<sender@example.net>"}),
            ("write", {}), ("read", {"sender": "<other@example.net>"})])

    @defer.inlineCallbacks
    def test_shelf_cleared_at_abort(self):
        """An ABORT from the MTA ends the transaction: the shelf is new after it."""
        seen = []

        def write(context, recipient):
            seen.append(dict(context.mail_transaction_shelf))
            context.mail_transaction_shelf["last"] = recipient

        def read(context, fqdn):
            seen.append(dict(context.mail_transaction_shelf))

        yield self.run_stopping(Scenario(
            children=[Kid("one")],
            steps=_steps([CONNECT, HELO, MAIL, RCPT, RCPT2]) + [(test_session.ABORT, None)]
            + _steps([HELO]),
        ), {"look": {"envelope_recipient": write, "helo": read}}, {"one": ["look"]})
        self.assertEqual(seen, [{}, {}, {"last": "<alice@example.org>"}, {}])

    @defer.inlineCallbacks
    def test_n_processing_sessions(self):
        """n_processing_sessions counts this session while it runs, and not once it closed."""
        seen = []

        def look(context, host, address):
            seen.append(context.n_processing_sessions)

        yield self.run_stopping(Scenario(children=[Kid("one")], steps=_steps([CONNECT])),
                                {"look": {"connect": look}}, {"one": ["look"]})
        self.assertEqual(seen, [1])
        self.assertEqual(self.factory.processing_sessions(), 0)


# ---------------------------------------------------------------- failures, Deferreds, timeouts


def _raises(context, sender):
    return 1 / 0


_raises.origin = "/etc/milter-manager/conditions.conf:12"


class FailingStopperTests(StopperTestCase):
    """A stopper that raises, fails or times out is logged and does not stop."""

    @defer.inlineCallbacks
    def test_raising_stopper_logged_not_stopping(self):
        """A stopper that raises is logged with its FILE:LINE; the child is not stopped."""
        lines = self.logged()
        yield self.run_stopping(Scenario(
            children=[Kid("one")],
            steps=_steps([CONNECT, HELO, MAIL, RCPT]),
            seen={"one": "connect helo mail rcpt abort close"},
        ), {"bad": {"envelope_from": _raises}}, {"one": ["bad"]})
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertIn("[stopper][error][envelope_from] one: "
                      "/etc/milter-manager/conditions.conf:12: _raises failed; not stopping",
                      lines)

    @defer.inlineCallbacks
    def test_raising_stopper_without_origin(self):
        """Without a recorded origin, the function's own file and line are logged."""
        lines = self.logged()

        def broken(context, host, address):
            raise ValueError("oops")

        code = broken.__code__
        yield self.run_stopping(Scenario(
            children=[Kid("one")], steps=_steps([CONNECT]), seen={"one": "connect close"},
        ), {"bad": {"connect": broken}}, {"one": ["bad"]})
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertIn(f"[stopper][error][connect] one: {code.co_filename}:"
                      f"{code.co_firstlineno}: broken failed; not stopping", lines)

    def test_other_stoppers_still_count(self):
        """After one stopper raised, a later stopper of the same stage may still stop."""
        d = self.run_stopping(Scenario(
            children=[Kid("one"), Kid("two")],
            steps=_steps([CONNECT, HELO, MAIL]),
            seen={"one": "connect helo close", "two": "connect helo mail abort close"},
        ), {"bad": {"envelope_from": _raises}, "stop": {"envelope_from": _always}},
            {"one": ["bad", "stop"]})
        return d.addCallback(lambda _: self.flushLoggedErrors(ZeroDivisionError))

    @defer.inlineCallbacks
    def test_deferred_stopper_waited_for(self):
        """A Deferred stopper holds its child's command; the other child is not delayed."""
        pending = []
        order = []

        def later(context, sender):
            order.append("asked")
            d = defer.Deferred()
            pending.append(d)
            return d

        def two_mail(command, macros):
            order.append("two got MAIL")
            reactor.callLater(0, pending[0].callback, False)
            return CONTINUE

        def one_mail(command, macros):
            order.append("one got MAIL")
            return CONTINUE

        yield self.run_stopping(Scenario(
            children=[Kid("one", replies={"mail": one_mail}), Kid("two", replies={"mail": two_mail})],
            steps=_steps([CONNECT, HELO, MAIL, RCPT]),
            seen={"one": "connect helo mail rcpt abort close",
                  "two": "connect helo mail rcpt abort close"},
        ), {"later": {"envelope_from": later}}, {"one": ["later"]})
        self.assertEqual(order, ["asked", "two got MAIL", "one got MAIL"])

    def test_deferred_stopper_stops(self):
        """A Deferred that fires True stops the child as a plain True would."""
        def later(context, sender):
            d = defer.Deferred()
            reactor.callLater(0, d.callback, "yes")
            return d

        return self.run_stopping(Scenario(
            children=[Kid("one"), Kid("two")],
            steps=_steps([CONNECT, HELO, MAIL, RCPT]),
            seen={"one": "connect helo close", "two": "connect helo mail rcpt abort close"},
        ), {"later": {"envelope_from": later}}, {"one": ["later"]})

    def test_deferred_stopper_in_message(self):
        """A Deferred header stopper of the live child: the header waits, then the child stops."""
        def later(context, name, value):
            d = defer.Deferred()
            reactor.callLater(0, d.callback, name == "From")
            return d

        return self.run_stopping(Scenario(
            children=[Kid("one"), Kid("two")],
            steps=_steps(TWO_HEADERS),
            seen={"one": "connect helo mail rcpt data header abort close",
                  "two": TWO_HEADERS_SEEN},
            aborted=("one",),
        ), {"later": {"header": later}}, {"one": ["later"]})

    def test_deferred_stopper_in_replay(self):
        """A Deferred body stopper of a replayed child is waited for, then stops it."""
        def later(context, chunk):
            d = defer.Deferred()
            reactor.callLater(0, d.callback, True)
            return d

        return self.run_stopping(Scenario(
            children=[Kid("one"), Kid("two")],
            steps=_steps([CONNECT, HELO, MAIL, RCPT, DATA, SUBJECT, EOH, BODY, EOM]),
            seen={"one": ALL_SEEN, "two": "connect helo mail rcpt data header eoh abort close"},
            aborted=("two",),
        ), {"later": {"body": later}}, {"two": ["later"]})

    def test_coroutine_stopper(self):
        """An async stopper is awaited like a Deferred one."""
        async def later(context, sender):
            d = defer.Deferred()
            reactor.callLater(0, d.callback, True)
            return await d

        return self.run_stopping(Scenario(
            children=[Kid("one"), Kid("two")],
            steps=_steps([CONNECT, HELO, MAIL]),
            seen={"one": "connect helo close", "two": "connect helo mail abort close"},
        ), {"later": {"envelope_from": later}}, {"one": ["later"]})

    @defer.inlineCallbacks
    def test_failed_deferred_logged_not_stopping(self):
        """A Deferred that fails is logged with the stopper's FILE:LINE and does not stop."""
        lines = self.logged()

        def later(context, sender):
            d = defer.Deferred()
            reactor.callLater(0, d.errback, ZeroDivisionError("lookup failed"))
            return d

        later.origin = "conf:7"
        yield self.run_stopping(Scenario(
            children=[Kid("one")],
            steps=_steps([CONNECT, HELO, MAIL]),
            seen={"one": "connect helo mail abort close"},
        ), {"later": {"envelope_from": later}}, {"one": ["later"]})
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertIn("[stopper][error][envelope_from] one: conf:7: later failed; not stopping",
                      lines)

    @defer.inlineCallbacks
    def test_stoppers_own_timeout_is_a_failure(self):
        """A stopper's own TimeoutError (a DNS query's) is logged as its failure, not ours."""
        lines = self.logged()

        def later(context, sender):
            return defer.fail(defer.TimeoutError("DNS query timed out"))

        later.origin = "conf:9"
        yield self.run_stopping(Scenario(
            children=[Kid("one")], steps=_steps([CONNECT, HELO, MAIL]),
        ), {"later": {"envelope_from": later}}, {"one": ["later"]})
        self.assertEqual(len(self.flushLoggedErrors(defer.TimeoutError)), 1)
        self.assertIn("[stopper][error][envelope_from] one: conf:9: later failed; not stopping",
                      lines)

    @defer.inlineCallbacks
    def test_stopper_timeout(self):
        """A stopper silent past the child's reading timeout is logged and does not stop."""
        lines = self.logged()
        cancelled = []

        def silent(context, sender):
            return defer.Deferred(cancelled.append)

        silent.origin = "conf:3"
        # two answers after 1 fake second; the harness moves the clock 11 s, past one's 10 s.
        yield self.run_stopping(Scenario(
            children=[Kid("one", timeouts=SLOW),
                      Kid("two", replies={"mail": Hang(CONTINUE, after=1)})],
            steps=_steps([CONNECT, HELO]) + [test_session.Send(MAIL, CONTINUE, advance=11)],
            seen={"one": "connect helo mail abort close", "two": "connect helo mail abort close"},
        ), {"silent": {"envelope_from": silent}}, {"one": ["silent"]})
        self.assertEqual(len(cancelled), 1)
        self.assertIn("[stopper][timeout][envelope_from] one: conf:3: silent gave no answer "
                      "in 10.0 s; not stopping", lines)

    @defer.inlineCallbacks
    def test_mta_gone_while_stopper_pending(self):
        """The MTA going away cancels a pending stopper: its child is sent nothing, no error logged."""
        lines = self.logged()
        cancelled = []

        def pending(context, sender):
            reactor.callLater(0, self.sessions[0].server.transport.loseConnection)
            return defer.Deferred(cancelled.append)

        d = self.run_stopping(Scenario(
            children=[Kid("one"), Kid("two")], steps=_steps([CONNECT, HELO, MAIL]),
        ), {"pending": {"envelope_from": pending}}, {"one": ["pending"]})
        yield self.assertFailure(d, error.ConnectionLost)
        self.assertEqual(len(cancelled), 1)
        self.assertEqual(self.flushLoggedErrors(), [])
        # (two, whose MAIL was on its way, is logged as failed when the MTA goes, as before.)
        self.assertEqual([line for line in lines if "] one:" in line], [])
        self.assertEqual(self.factory.processing_sessions(), 0)

    def test_sync_true_cancels_pending(self):
        """A true answer decides at once: a pending Deferred of the same stage is cancelled."""
        cancelled = []

        def slow(context, sender):
            return defer.Deferred(cancelled.append)

        d = self.run_stopping(Scenario(
            children=[Kid("one")],
            steps=[(CONNECT, CONTINUE), (HELO, CONTINUE), (MAIL, ACCEPT)],
            seen={"one": "connect helo close"},
        ), {"stop": {"envelope_from": [slow, _always]}}, {"one": ["stop"]})
        return d.addCallback(lambda _: self.assertEqual(len(cancelled), 1))

    def test_no_conditions_no_context(self):
        """A child without applicable conditions gets no context; the session stays on its plain path."""
        d = self.run_stopping(Scenario(
            children=[Kid("one"), Kid("two")],
            steps=_steps([CONNECT, HELO, MAIL]),
        ), {"stop": {"envelope_from": _always}}, {"two": ["stop"]})

        def check(_):
            (session,) = self.sessions
            one, two = session.children
            self.assertEqual((one.stoppers, one.context, one.accepted), (None, None, None))
            self.assertEqual(list(two.stoppers), ["envelope_from"])
            self.assertEqual(list(session.stoppers.facts.children), ["one", "two"])
        return d.addCallback(check)


# ---------------------------------------------------------------- SocketAddress


def _address(family, address=b"", port=0):
    return SocketAddress.from_connect(Connect(b"host", family, port, address))


class SocketAddressTests(unittest.TestCase):
    """SocketAddress: upstream's families, text form and local-ness."""

    def test_ipv4(self):
        """An IPv4 client: family, address, port, text, ip_address."""
        address = _address(c.FAMILY_INET, b"192.0.2.10", 52258)
        self.assertEqual((address.family, address.address, address.port, address.path),
                         ("inet", "192.0.2.10", 52258, None))
        self.assertEqual((address.ipv4, address.ipv6, address.unix, address.unknown),
                         (True, False, False, False))
        self.assertEqual(str(address), "inet:52258@[192.0.2.10]")
        self.assertEqual(address.ip_address, ipaddress.IPv4Address("192.0.2.10"))
        self.assertFalse(address.local)

    def test_ipv4_local(self):
        """Loopback and RFC 1918 addresses are local; others are not."""
        for text, local in [("127.0.0.1", True), ("10.1.2.3", True), ("172.16.0.1", True),
                            ("172.31.255.255", True), ("172.32.0.1", False),
                            ("192.168.1.1", True), ("192.169.1.1", False), ("8.8.8.8", False),
                            ("169.254.1.1", False)]:
            self.assertEqual((text, _address(c.FAMILY_INET, text.encode(), 25).local),
                             (text, local))

    def test_ipv6(self):
        """An IPv6 client: Sendmail's IPv6: prefix dropped, inet6 text form."""
        address = _address(c.FAMILY_INET6, b"IPv6:2001:db8::1", 25)
        self.assertEqual((address.family, address.address, address.port),
                         ("inet6", "2001:db8::1", 25))
        self.assertEqual((address.ipv4, address.ipv6, address.unix, address.unknown),
                         (False, True, False, False))
        self.assertEqual(str(address), "inet6:25@[2001:db8::1]")
        self.assertEqual(address.ip_address, ipaddress.IPv6Address("2001:db8::1"))
        self.assertFalse(address.local)

    def test_ipv6_local(self):
        """::1, link-local and unique local addresses are local; IPv4-mapped ones as IPv4."""
        for text, local in [("::1", True), ("fe80::1", True), ("fe80::1%eth0", True),
                            ("fd00::1", True), ("fc00::1", True), ("2001:db8::1", False),
                            ("::ffff:192.168.0.1", True), ("::ffff:8.8.8.8", False)]:
            self.assertEqual((text, _address(c.FAMILY_INET6, text.encode(), 25).local),
                             (text, local))

    def test_unix(self):
        """A UNIX socket client: its path, always local, no IP."""
        address = _address(c.FAMILY_UNIX, b"/var/run/smtp.sock")
        self.assertEqual((address.family, address.path, address.address, address.port),
                         ("unix", "/var/run/smtp.sock", None, None))
        self.assertEqual((address.ipv4, address.ipv6, address.unix, address.unknown),
                         (False, False, True, False))
        self.assertEqual(str(address), "unix:/var/run/smtp.sock")
        self.assertIsNone(address.ip_address)
        self.assertTrue(address.local)

    def test_unknown(self):
        """An unknown family: no address, never local."""
        address = _address(c.FAMILY_UNKNOWN)
        self.assertEqual((address.ipv4, address.ipv6, address.unix, address.unknown),
                         (False, False, False, True))
        self.assertEqual(str(address), "unknown")
        self.assertIsNone(address.ip_address)
        self.assertFalse(address.local)

    def test_unparsable_address(self):
        """An inet address that is no IP has no ip_address and is not local."""
        address = _address(c.FAMILY_INET, b"not-an-ip", 25)
        self.assertIsNone(address.ip_address)
        self.assertFalse(address.local)

    def test_equality(self):
        """Two SocketAddresses of the same client are equal."""
        self.assertEqual(_address(c.FAMILY_INET, b"192.0.2.1", 25),
                         _address(c.FAMILY_INET, b"192.0.2.1", 25))


class MacroNameTests(unittest.TestCase):
    """macro_name: the form a macro set by a stopper is sent in."""

    def test_forms(self):
        """One letter bare, longer names in braces, from str or bytes, braces or not."""
        self.assertEqual([macro_name(name) for name in ("j", "{j}", b"i", "daemon_name",
                                                        "{daemon_name}", b"{auth_type}")],
                         [b"j", b"j", b"i", b"{daemon_name}", b"{daemon_name}",
                          b"{auth_type}"])
