"""The pages that show: dashboard, recent sessions, a session's trace, the configuration.

Every page here only reads (GET, HEAD); the guard has checked the login
before any of them runs. The dashboard is an HTML page rendered with the
numbers of the moment, which static/dashboard.js then refreshes from
/api/dashboard every 2 seconds and draws as inline SVG; /api/sessions is
the sessions list as JSON. A bad query string gets a 400 page saying
what was expected, never a traceback.
"""

import json
import os
import re

from twisted.web import resource, static

from ..config.model import settings_of, show
from ..merge import Status
from ..status import iso_time
from .activity import RANGES
from .templates import esc, page

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
MAX_QUERY = 200  # characters of a search: more is not a search
MAX_SESSION_DIGITS = 18  # a session number in this process fits in far fewer
REFRESH_SECONDS = 2
# The verdicts in the order the dashboard stacks and lists them (worst on top).
VERDICTS = ("accept", "continue", "skip", "not-change", "temporary-failure", "reject",
            "discard", "aborted")


def install(app, root):
    root.putChild(b"", Dashboard(app))
    root.putChild(b"sessions", Sessions(app))
    root.putChild(b"configuration", ConfigurationPage(app))
    api = Api()
    api.putChild(b"dashboard", DashboardData(app))
    api.putChild(b"sessions", SessionsData(app))
    root.putChild(b"api", api)
    root.putChild(b"static", StaticFiles(STATIC))


class BadRequest(Exception):
    """A query string the page cannot use; str() says what was expected."""


def argument(request, name, default=""):
    """The first value of query argument name as text; BadRequest if it is not UTF-8 or too long."""
    values = request.args.get(name.encode("ascii"))
    if not values:
        return default
    try:
        text = values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"the {name} parameter is not UTF-8 text") from None
    if len(text) > MAX_QUERY or "\0" in text:
        raise BadRequest(f"the {name} parameter is at most {MAX_QUERY} characters of text")
    return text


def range_of(request):
    """The range asked for (hour by default); BadRequest for another."""
    value = argument(request, "range", "hour")
    if value not in RANGES:
        raise BadRequest(f"range is {' or '.join(RANGES)}, not {value!r}")
    return value


def error_page(request, code, title, message):
    request.setResponseCode(code)
    return page(request, title, f'<p class="error" role="alert">{esc(message)}</p>')


def json_response(request, data, code=200):
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(data, indent=None, separators=(",", ":")).encode("utf-8")


def verdict_order(labels):
    """labels in VERDICTS order, others after them by name."""
    return sorted(labels, key=lambda label: (
        VERDICTS.index(label) if label in VERDICTS else len(VERDICTS), label))


# ---------------------------------------------------------------- dashboard


def dashboard_data(app, range="hour"):
    """What /api/dashboard answers (see docs/web-pages.part.md for each field)."""
    service = app.service
    controller = app.controller
    factory = service.factory
    now = app.clock.seconds()
    data = app.activity.snapshot(range)
    status = controller.status.snapshot(service.configuration, factory.health,
                                        factory.connections, controller.generation,
                                        controller.loaded_at)
    activity = data["children"]
    children = []
    listed = set()
    for entry in status["children"]:
        name = entry["name"]
        listed.add(name)
        milter = service.configuration.milter(name)
        children.append(_child_row(name, entry, milter, activity.get(name)))
    for name in sorted(set(activity) - listed):
        children.append(_child_row(name, None, None, activity[name]))
    return {
        "now": iso_time(now),
        "now_epoch": round(now, 3),
        "range": data["range"],
        "minutes": data["minutes"],
        "start": data["start"],
        "step": data["step"],
        "verdicts": verdict_order(set(data["series"]) | {"accept", "continue", "reject"}),
        "series": data["series"],
        "messages": data["messages"],
        "children": children,
        "totals": {
            "since": status["started"],
            "sessions": status["sessions"]["started"],
            "in_flight": status["sessions"]["in_flight"],
            "messages": status["messages"]["total"],
            "verdicts": status["messages"]["verdicts"],
        },
        "refresh_seconds": REFRESH_SECONDS,
    }


def _child_row(name, entry, milter, counts):
    counts = counts or {"replies": {}, "fallbacks": 0, "stops": 0, "samples": 0,
                        "p50_ms": None, "p99_ms": None}
    return {
        "name": name,
        "state": entry["state"] if entry else "unknown",
        "since": entry["since"] if entry else None,
        "failures_in_row": entry["failures_in_row"] if entry else 0,
        "configured": milter is not None,
        "evaluation_mode": bool(milter is not None and milter.evaluation_mode),
        "replies": counts["replies"],
        "fallbacks": counts["fallbacks"],
        "stops": counts["stops"],
        "samples": counts["samples"],
        "p50_ms": counts["p50_ms"],
        "p99_ms": counts["p99_ms"],
    }


def _number(value):
    return "–" if value is None else f"{value:g}"


def _replies_text(replies):
    return ", ".join(f"{label} {replies[label]}" for label in verdict_order(replies)) or "–"


def _dashboard_body(data):
    range_links = " ".join(
        f'<a href="/?range={name}" class="range-link{" active" if name == data["range"] else ""}"'
        f' data-range="{name}">Last {name}</a>' for name in RANGES)
    verdicts = data["messages"]["verdicts"]
    counts = "".join(
        f'<li class="verdict-count" data-verdict="{esc(label)}">'
        f'<span class="swatch v-{esc(label)}"></span>{esc(label)} '
        f'<span class="count" id="verdict-count-{esc(label)}">{verdicts.get(label, 0)}</span></li>'
        for label in data["verdicts"])
    rows = "".join(_child_html(child) for child in data["children"])
    totals = data["totals"]
    return f"""
<div id="dashboard" data-range="{esc(data["range"])}" data-refresh="{data["refresh_seconds"]}">
<p class="ranges">{range_links}</p>
<section class="summary">
<div class="stat"><span class="label">Messages, last {esc(data["range"])}</span>
<span class="value" id="messages-total">{data["messages"]["total"]}</span></div>
<div class="stat"><span class="label">Messages since start</span>
<span class="value" id="messages-since-start">{totals["messages"]}</span></div>
<div class="stat"><span class="label">Sessions since start</span>
<span class="value" id="sessions-total">{totals["sessions"]}</span></div>
<div class="stat"><span class="label">Connections now</span>
<span class="value" id="in-flight">{totals["in_flight"]}</span></div>
</section>
<ul class="legend" id="verdict-counts">{counts}</ul>
<h2>Messages per minute by verdict</h2>
<div id="chart" class="chart"><p class="muted">The chart needs JavaScript; the numbers above
are those of when the page was loaded.</p></div>
<h2>Children</h2>
<table class="children" id="children">
<thead><tr><th>Child</th><th>State</th><th>Since</th><th>Failures in a row</th>
<th>Replies by verdict</th><th>Fallbacks</th><th>Stops</th><th>p50 ms</th><th>p99 ms</th>
</tr></thead>
<tbody>{rows}</tbody></table>
<p class="muted">Latency percentiles are over the child's replies in the range, from
log-spaced buckets (within about 15 %). Updated <span id="updated">{esc(data["now"])}</span>
<span id="update-status"></span></p>
</div>"""


def _child_html(child):
    evaluation = ' <span class="tag">evaluation</span>' if child["evaluation_mode"] else ""
    return (f'<tr class="child-row" data-child="{esc(child["name"])}">'
            f'<td class="name">{esc(child["name"])}{evaluation}</td>'
            f'<td class="state state-{esc(child["state"])}">{esc(child["state"])}</td>'
            f'<td class="since">{esc(child["since"] or "–")}</td>'
            f'<td class="failures">{child["failures_in_row"]}</td>'
            f'<td class="replies">{esc(_replies_text(child["replies"]))}</td>'
            f'<td class="fallbacks">{child["fallbacks"]}</td>'
            f'<td class="stops">{child["stops"]}</td>'
            f'<td class="p50">{_number(child["p50_ms"])}</td>'
            f'<td class="p99">{_number(child["p99_ms"])}</td></tr>')


class Dashboard(resource.Resource):
    isLeaf = True

    def __init__(self, app):
        super().__init__()
        self.app = app

    def render_GET(self, request):
        if request.postpath not in ([], [b""]):
            return error_page(request, 404, "Not found", "There is no such page.")
        try:
            chosen = range_of(request)
        except BadRequest as error:
            return error_page(request, 400, "Bad request", str(error))
        return page(request, "Dashboard", _dashboard_body(dashboard_data(self.app, chosen)),
                    scripts=("dashboard.js",), active="/")


class Api(resource.Resource):
    def getChild(self, name, request):
        return JSONError(404, "no such API: /api/dashboard and /api/sessions exist")

    def render_GET(self, request):
        return json_response(request, {"error": "/api/dashboard and /api/sessions exist"}, 404)


class JSONError(resource.Resource):
    isLeaf = True

    def __init__(self, code, message):
        super().__init__()
        self.code = code
        self.message = message

    def render_GET(self, request):
        return json_response(request, {"error": self.message}, self.code)


class DashboardData(resource.Resource):
    isLeaf = True

    def __init__(self, app):
        super().__init__()
        self.app = app

    def render_GET(self, request):
        try:
            chosen = range_of(request)
        except BadRequest as error:
            return json_response(request, {"error": str(error)}, 400)
        return json_response(request, dashboard_data(self.app, chosen))


# ---------------------------------------------------------------- sessions


def _sessions_body(query, messages, kept):
    rows = "".join(
        f'<tr class="session-row" data-session="{message["session"]}">'
        f'<td class="time">{esc(message["time"])}</td>'
        f'<td class="session"><a class="trace-link" href="/sessions/{message["session"]}">'
        f'{message["session"]}</a></td>'
        f'<td class="queue-id">{esc(message["queue_id"] or "–")}</td>'
        f'<td class="client">{esc(message["client"] or "–")}</td>'
        f'<td class="sender">{esc(message["sender"] if message["sender"] is not None else "–")}'
        f'</td><td class="recipients">{message["recipients"]}</td>'
        f'<td class="verdict"><span class="swatch v-{esc(message["verdict"])}"></span>'
        f'{esc(message["verdict"])}</td>'
        f'<td class="stage">{esc(message["stage"])}</td>'
        f'<td class="decided-by">{esc(message["decided_by"] or "–")}</td></tr>'
        for message in messages)
    if query:
        summary = (f'{len(messages)} of the last {kept} messages match '
                   f'<q id="query-shown">{esc(query)}</q>.')
    else:
        summary = f"The last {kept} messages, newest first."
    empty = '<p class="muted" id="no-sessions">No message to show.</p>' if not messages else ""
    return f"""
<form class="search" method="get" action="/sessions">
<label>Search <input id="q" name="q" type="search" value="{esc(query)}"
placeholder="queue id, client, sender, verdict, child"></label>
<button type="submit">Search</button></form>
<p id="sessions-summary">{summary}</p>{empty}
<table class="sessions" id="sessions">
<thead><tr><th>Time</th><th>Session</th><th>Queue id</th><th>Client</th><th>Sender</th>
<th>Recipients</th><th>Verdict</th><th>Stage</th><th>Decided by</th></tr></thead>
<tbody>{rows}</tbody></table>"""


class Sessions(resource.Resource):
    def __init__(self, app):
        super().__init__()
        self.app = app

    def getChild(self, name, request):
        if name == b"":
            return self
        return Trace(self.app, name)

    def render_GET(self, request):
        try:
            query = argument(request, "q")
        except BadRequest as error:
            return error_page(request, 400, "Bad request", str(error))
        messages = self.app.activity.messages(query)
        return page(request, "Sessions",
                    _sessions_body(query, messages, len(self.app.activity.recent)),
                    active="/sessions")


class SessionsData(resource.Resource):
    isLeaf = True

    def __init__(self, app):
        super().__init__()
        self.app = app

    def render_GET(self, request):
        try:
            query = argument(request, "q")
        except BadRequest as error:
            return json_response(request, {"error": str(error)}, 400)
        return json_response(request, {"query": query,
                                       "kept": len(self.app.activity.recent),
                                       "messages": self.app.activity.messages(query)})


# ---------------------------------------------------------------- a session's trace


def _decisions_table(decisions):
    if not decisions:
        return '<p class="muted">No decision recorded.</p>'
    rows = []
    for entry in decisions:
        kind = entry["decision"]
        if kind == "replied":
            detail = f'{esc(entry["verdict"])}'
            if entry["verdict"] != entry["status"]:
                detail += f' (counts as {esc(entry["status"])}: evaluation mode)'
            if entry.get("reply"):
                detail += f' <code>{esc(entry["reply"])}</code>'
            elapsed = _number(entry["elapsed_ms"])
        elif kind == "stopped":
            detail = (f'condition {esc(entry["condition"])}, {esc(entry["stopper"])} '
                      f'({esc(entry["origin"])})')
            elapsed = "–"
        else:
            detail = (f'{esc(entry["status"])} because {esc(entry["cause"])}: '
                      f'{esc(entry["reason"])}')
            elapsed = "–"
        rows.append(f'<tr class="decision decision-{esc(kind)}"><td>{esc(entry["stage"])}</td>'
                    f'<td>{esc(entry["child"])}</td><td>{esc(kind)}</td><td>{detail}</td>'
                    f'<td>{elapsed}</td></tr>')
    return ('<table class="decisions"><thead><tr><th>Stage</th><th>Child</th><th>Decision</th>'
            '<th>Verdict or reason</th><th>ms</th></tr></thead><tbody>'
            + "".join(rows) + "</tbody></table>")


def _trace_body(trace):
    ended = "ended" if trace["ended"] else "still open"
    elapsed = "" if trace["elapsed"] is None else f', {trace["elapsed"]:g} s'
    parts = [f'<p id="trace-summary">Session {trace["session"]}, started '
             f'{esc(trace["started"])}, {ended}{elapsed}. Children: '
             f'{esc(", ".join(trace["children"]) or "none")}.</p>',
             "<h2>Connection</h2>", _decisions_table(trace["connection"])]
    for index, message in enumerate(trace["messages"], 1):
        parts.append(
            f'<section class="message" data-queue-id="{esc(message["queue_id"] or "")}">'
            f'<h2>Message {index}: queue id {esc(message["queue_id"] or "–")}</h2>'
            f'<p>Verdict <strong class="verdict">{esc(message["verdict"])}</strong> at '
            f'{esc(message["stage"])}, decided by {esc(message["decided_by"] or "no child")}, '
            f'{message["elapsed"]:g} s after MAIL.</p>'
            f'{_decisions_table(message["decisions"])}</section>')
    if "in_progress" in trace:
        parts += ["<h2>Message in progress</h2>", _decisions_table(trace["in_progress"])]
    if trace["dropped"]:
        parts.append(f'<p class="muted">{trace["dropped"]} more decisions were not kept.</p>')
    return "".join(parts)


class Trace(resource.Resource):
    isLeaf = True

    def __init__(self, app, name):
        super().__init__()
        self.app = app
        self.name = name

    def render_GET(self, request):
        text = self.name.decode("ascii", "replace")
        if (request.postpath not in ([], [b""]) or not re.fullmatch(rb"[0-9]+", self.name)
                or len(self.name) > MAX_SESSION_DIGITS):
            return error_page(request, 400, "Bad request",
                              f"/sessions/NUMBER takes a session number (digits), "
                              f"not {text!r}")
        trace = self.app.controller.trace
        if trace is None:
            return error_page(request, 404, "No trace",
                              "No session trace is kept: controller.trace_sessions is 0.")
        found = trace.find(str(int(self.name)))
        if found is None:
            return error_page(
                request, 404, "Session not kept",
                f"Session {int(self.name)} is no longer kept (or never was): the trace keeps "
                f"the sessions in flight and the last {trace.limit} finished ones "
                f"(controller.trace_sessions).")
        return page(request, f"Session {found['session']}", _trace_body(found),
                    active="/sessions")


# ---------------------------------------------------------------- configuration


def value_text(item, value):
    """A setting's value as the configuration page shows it; secrets as model.show hides them."""
    shown = show(item, value)
    if shown == "<hidden>":
        return shown
    if value is None:
        return "(not set)"
    if item.metadata.get("literal"):
        return item.metadata["literal"](value)
    if isinstance(value, Status):
        return value.label
    if isinstance(value, (list, tuple)):
        return ", ".join(str(entry) for entry in value) or "(empty)"
    return str(value)


def settings_table(section, table_id):
    """A table setting / value / origin of section's settings."""
    rows = []
    for name, item in settings_of(section).items():
        origin = section.origins.get(name)
        rows.append(
            f'<tr class="setting" data-setting="{esc(name)}"><th scope="row">{esc(name)}</th>'
            f'<td class="value">{esc(value_text(item, getattr(section, name)))}</td>'
            f'<td class="origin{"" if origin else " default"}">{esc(origin or "default")}</td>'
            f'<td class="doc">{esc(item.metadata.get("doc") or "")}</td></tr>')
    return (f'<table class="settings" id="{esc(table_id)}"><thead><tr><th>Setting</th>'
            f'<th>Value</th><th>Origin</th><th>Meaning</th></tr></thead><tbody>'
            + "".join(rows) + "</tbody></table>")


def _entry_text(entry):
    pattern = getattr(entry, "pattern", None)
    if isinstance(pattern, str):
        return pattern
    domain = getattr(entry, "domain", None)
    if isinstance(domain, str):
        return domain
    return str(entry)


def _helper_html(helper):
    parts = []
    if settings_of(helper):
        parts.append(settings_table(helper, f"section-{helper.SECTION}"))
    for call in getattr(helper, "calls", ()):
        parts.append(f'<p class="call"><code>{esc(helper.SECTION)}.{esc(call.verb)}('
                     f'{esc(call.arguments if call.arguments is not None else "…")})</code> '
                     f'<span class="origin">{esc(call.origin or "default")}</span></p>')
    for attribute, defaults, meaning in helper.EFFECTIVE:
        entries = getattr(helper, attribute)
        items = "".join(
            f'<li>{esc(_entry_text(entry))} <span class="origin">'
            f'{"default" if entry in defaults else "added by a call above"}</span></li>'
            for entry in entries) or "<li>(none)</li>"
        parts.append(f'<details><summary>{esc(helper.SECTION)}.{esc(attribute)}: '
                     f'{len(entries)} in effect ({esc(meaning)})</summary>'
                     f'<ul class="entries">{items}</ul></details>')
    return "".join(parts)


def _conditions_html(configuration):
    if not configuration.conditions:
        return '<p class="muted">No applicable condition is defined.</p>'
    parts = []
    for condition in configuration.conditions.values():
        where = condition.origins.get("name") or "default"
        if condition.helper is not None:
            call = condition.helper
            how = (f'defined by <code>{esc(call.verb)}({esc(call.arguments or "…")})</code> '
                   f'<span class="origin">{esc(call.origin or "default")}</span>')
        else:
            stoppers = "".join(
                f'<li><code>{esc(stopper.kind)}</code> stopper {esc(stopper.name)} '
                f'<span class="origin">{esc(stopper.origin or "default")}</span></li>'
                for stopper in condition.stoppers) or "<li>(no stopper)</li>"
            how = f'<ul class="stoppers">{stoppers}</ul>'
        parts.append(
            f'<section class="condition" data-condition="{esc(condition.name)}">'
            f'<h3>{esc(condition.name)} <span class="origin">{esc(where)}</span></h3>'
            f'<p>{esc(condition.description or "")}</p>{how}</section>')
    return "".join(parts)


def configuration_body(configuration):
    parts = [f'<p>Files loaded, in order: '
             f'{esc(", ".join(configuration.files) or "none (the embedded default)")}.</p>',
             '<p class="muted">Each value shows where it was set (FILE:LINE, or a '
             'command-line option), or "default". Secret settings are never shown.</p>',
             '<nav class="toc">'
             + " ".join(f'<a href="#{esc(section.SECTION)}">{esc(section.SECTION)}</a>'
                        for section in configuration.sections())
             + ' <a href="#children">children</a> <a href="#conditions">conditions</a>'
             ' <a href="#helpers">condition helpers</a></nav>']
    for section in configuration.sections():
        parts.append(f'<h2 id="{esc(section.SECTION)}">{esc(section.SECTION)}</h2>')
        parts.append(settings_table(section, f"section-{section.SECTION}"))
    parts.append('<h2 id="children">Children</h2>')
    if not configuration.milters:
        parts.append('<p class="muted">No child milter is defined.</p>')
    for milter in configuration.milters:
        where = milter.origins.get("name") or "default"
        parts.append(f'<section class="milter" data-milter="{esc(milter.name)}">'
                     f'<h3>{esc(milter.name)} <span class="origin">{esc(where)}</span></h3>'
                     f'{settings_table(milter, "milter-" + milter.name)}</section>')
    parts.append('<h2 id="conditions">Applicable conditions</h2>')
    parts.append(_conditions_html(configuration))
    parts.append('<h2 id="helpers">Condition helpers</h2>')
    for helper in configuration.helpers():
        if helper.SECTION == "ldap" and not (helper.origins or helper.calls):
            continue  # LDAP unused: nothing to show
        parts.append(f'<h3 id="helper-{esc(helper.SECTION)}">{esc(helper.SECTION)}</h3>')
        parts.append(_helper_html(helper) or '<p class="muted">Nothing to set.</p>')
    return "".join(parts)


class ConfigurationPage(resource.Resource):
    isLeaf = True

    def __init__(self, app):
        super().__init__()
        self.app = app

    def render_GET(self, request):
        if request.postpath not in ([], [b""]):
            return error_page(request, 404, "Not found", "There is no such page.")
        return page(request, "Configuration",
                    configuration_body(self.app.service.configuration),
                    active="/configuration")


# ---------------------------------------------------------------- static files


class StaticFiles(static.File):
    """miltermanager/web/static: the style sheet and scripts; no directory listing."""

    def directoryListing(self):
        return resource.NoResource("No such file.")

    def render_GET(self, request):
        request.setHeader(b"cache-control", b"no-cache")  # revalidated: an upgrade shows
        request.setHeader(b"x-content-type-options", b"nosniff")
        return super().render_GET(request)
