"""The pages that change the configuration (admin role): forms, diff, confirm, undo.

    /edit                 the children, the lists, links to each form
    /edit/milter/NAME     a child's form (POST: check it, then show the diff)
    /edit/new             a new child's form
    /edit/remove          POST name: remove a child (shows the diff)
    /edit/lists           the condition helpers' lists
    /edit/confirm         POST token: write the change shown, then reload
    /edit/history         the kept versions; /edit/undo POST version: put one back

Everyone logged in may read them (a read-only user sees the forms
disabled); the guard lets only an admin's POST with the CSRF token
through. Every form carries the custom file's hash as it was when the page
was made (file_sha256): a change to a file edited since is refused.
"""

import time

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

from ..config.model import ConfigurationError
from . import editing
from .templates import csrf_field, esc, page

STYLE = '<link rel="stylesheet" href="/static/edit.css">'
LABELS = {
    "name": "Name",
    "enabled": "Enabled",
    "evaluation_mode": "Evaluation mode (log its verdict, do not apply it)",
    "fallback_status": "Fallback status",
    "applicable_conditions": "Applicable conditions",
    "connection_spec": "Connection spec",
    "connection_timeout": "Connection timeout (s)",
    "writing_timeout": "Writing timeout (s)",
    "reading_timeout": "Reading timeout (s)",
    "end_of_message_timeout": "End-of-message timeout (s)",
    "description": "Description",
    "dnsbl_services": "DNSBL services (one a line: ZONE [CIDR,CIDR])",
    "trust_domains": "Trusted envelope-from domains (one a line; /RE/ an expression)",
    "s25r_whitelist": "S25R whitelist, added to the main files' (one a line; .suffix, name or /RE/)",
    "s25r_blacklist": "S25R blacklist, added to the main files' (one a line; name or /RE/)",
}


class BadRequest(Exception):
    """A request the pages cannot read; str() says why."""


def install(app, root):
    root.putChild(b"edit", EditRoot(app))


def _arg(request, name, default=None):
    values = request.args.get(name.encode("ascii"))
    if not values:
        if default is None:
            raise BadRequest(f"the form field {name!r} is missing")
        return default
    try:
        return values[-1].decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"the form field {name!r} is not UTF-8 text") from None


def _args(request):
    """All form fields as {name: [str]}; BadRequest for bytes that are not UTF-8."""
    try:
        return {key.decode("utf-8"): [value.decode("utf-8") for value in values]
                for key, values in request.args.items()}
    except UnicodeDecodeError:
        raise BadRequest("the form is not UTF-8 text") from None


def _is_admin(request):
    user = getattr(request, "web_user", None)
    return user is not None and user.is_admin


def _user(request):
    return request.web_user.name


def _hidden(name, value):
    return f'<input type="hidden" name="{esc(name)}" value="{esc(value)}">'


def _message(request, code, title, text):
    request.setResponseCode(code)
    return page(request, title, f'{STYLE}<p class="error" role="alert">{esc(text)}</p>'
                f'<p><a href="/edit">Back to the configuration editor</a></p>', active="/edit")


def _row(name, control, errors=(), origin=None):
    note = f' <span class="origin">set at {esc(origin)}</span>' if origin else ""
    problems = "".join(f'<span class="field-error" role="alert">{esc(text)}</span>'
                       for text in errors)
    return (f'<div class="row" id="row-{esc(name)}"><label for="field-{esc(name)}">'
            f'{esc(LABELS.get(name, name))}</label>{control}{note}{problems}</div>')


def _general(texts):
    if not texts:
        return ""
    items = "".join(f"<li>{esc(text)}</li>" for text in texts)
    return f'<div class="errors" role="alert"><p>The configuration would not load:</p><ul>{items}</ul></div>'


def _readonly_note(request):
    if _is_admin(request):
        return ""
    return '<p class="note">You may only read (role read-only): the forms are disabled.</p>'


def _guarded(render):
    """Run a page's render; bad input and refusals become a clear 4xx page."""
    def wrapper(self, request):
        try:
            return render(self, request)
        except BadRequest as error:
            return _message(request, 400, "Bad request", str(error))
        except editing.EditRefused as error:
            return _message(request, 409, "Not changed", str(error))
        except ConfigurationError as error:
            return _message(request, 409, "The configuration does not load",
                            f"The configuration cannot be edited until it loads: {error}")
    wrapper.__name__ = render.__name__
    return wrapper


class _Page(resource.Resource):
    isLeaf = True
    log = Logger()

    def __init__(self, app):
        super().__init__()
        self.app = app

    @property
    def editor(self):
        return self.app.editor


def _diff_html(text):
    lines = []
    for line in text.splitlines():
        kind = ("add" if line.startswith("+") and not line.startswith("+++") else
                "del" if line.startswith("-") and not line.startswith("---") else
                "hunk" if line.startswith("@@") else "same")
        lines.append(f'<span class="{kind}">{esc(line)}</span>')
    return '<pre class="diff">' + "\n".join(lines) + "</pre>"


def _proposal_page(request, editor, proposal, back):
    """The diff of a checked change and the form that confirms it."""
    pending = proposal.pending
    body = (f'{STYLE}<p>The change: {esc(pending.summary)}.</p>'
            f'<p>milter-manager.custom.conf ({esc(editor.path)}) becomes:</p>'
            f'{_diff_html(proposal.diff) if proposal.diff else "<p>(no difference)</p>"}'
            f'<form class="confirm" method="post" action="/edit/confirm">{csrf_field(request)}'
            f'{_hidden("token", pending.token)}'
            f'{_hidden("file_sha256", editing.digest(pending.before))}'
            f'<button type="submit" name="confirm" value="yes">Write it and reload</button> '
            f'<a href="{esc(back)}">Cancel</a></form>')
    return page(request, "Confirm the change", body, active="/edit")


# ---------------------------------------------------------------- overview


class EditRoot(_Page):
    isLeaf = False

    def __init__(self, app):
        super().__init__(app)
        self.putChild(b"milter", MilterDirectory(app))
        self.putChild(b"new", NewMilterPage(app))
        self.putChild(b"remove", RemovePage(app))
        self.putChild(b"lists", ListsPage(app))
        self.putChild(b"confirm", ConfirmPage(app))
        self.putChild(b"history", HistoryPage(app))
        self.putChild(b"undo", UndoPage(app))

    def getChild(self, path, request):
        if path == b"":
            return self
        return resource.NoResource("no such page in the configuration editor")

    @_guarded
    def render_GET(self, request):
        editor = self.editor
        file_hash = editor.file_hash()
        state, configuration, _ = editor.state()
        admin = _is_admin(request)
        rows = []
        for name, values in state.milters:
            link = f"/edit/milter/{esc(_quote(name))}"
            remove = ""
            if admin:
                remove = (f'<form class="remove" method="post" action="/edit/remove">'
                          f'{csrf_field(request)}{_hidden("file_sha256", file_hash)}'
                          f'{_hidden("name", name)}<button type="submit">Remove</button></form>')
            rows.append(
                f'<tr data-milter="{esc(name)}"><td><a href="{link}">{esc(name)}</a></td>'
                f'<td>{"yes" if values["enabled"] else "no"}</td>'
                f'<td>{"on" if values["evaluation_mode"] else "off"}</td>'
                f'<td>{esc(values["fallback_status"])}</td>'
                f'<td>{esc(values["connection_spec"])}</td>'
                f'<td>{esc(", ".join(values["applicable_conditions"]))}</td>'
                f'<td><a href="{link}">{"Edit" if admin else "View"}</a> {remove}</td></tr>')
        table = ('<table class="children"><thead><tr><th>Child</th><th>Enabled</th>'
                 '<th>Evaluation mode</th><th>Fallback</th><th>Connection spec</th>'
                 '<th>Applicable conditions</th><th></th></tr></thead><tbody>'
                 + "".join(rows) + "</tbody></table>") if rows else "<p>No child milter.</p>"
        add = '<p><a href="/edit/new">Add a child milter</a></p>' if admin else ""
        body = (f'{STYLE}{_readonly_note(request)}'
                f'<p>Changes are written to <code>{esc(editor.path)}</code>, loaded after the '
                f'main files, then the configuration is reloaded as on SIGHUP.</p>'
                f'<h2>Child milters</h2>{table}{add}'
                f'<h2>Condition helpers</h2><p><a href="/edit/lists">DNSBL services, trusted '
                f'domains, S25R lists</a></p>'
                f'<h2>History</h2><p><a href="/edit/history">Earlier versions and undo</a></p>')
        return page(request, "Edit the configuration", body, active="/edit")


def _quote(name):
    from urllib.parse import quote

    return quote(name, safe="")


# ---------------------------------------------------------------- a child's form


def _milter_form(request, action, values, conditions, file_hash, errors=None, general=(),
                 origins=None, new=False, name=None):
    errors = errors or {}
    origins = origins or {}
    disabled = "" if _is_admin(request) else " disabled"
    rows = []
    if new:
        rows.append(_row("name", f'<input id="field-name" name="name" value="{esc(name or "")}" '
                                 f'required>', errors.get("name", ())))
    for field in editing.MILTER_FIELDS:
        value = values.get(field)
        if field in editing.BOOLEAN_FIELDS:
            control = (f'<input id="field-{field}" type="checkbox" name="{field}" value="on"'
                       f'{" checked" if value else ""}>')
        elif field == "fallback_status":
            options = "".join(
                f'<option{" selected" if choice == value else ""}>{esc(choice)}</option>'
                for choice in editing.FALLBACK_NAMES)
            control = f'<select id="field-{field}" name="{field}">{options}</select>'
        elif field == "applicable_conditions":
            chosen = list(value or [])
            names = list(dict.fromkeys([*conditions, *chosen]))
            control = '<span class="choices" id="field-applicable_conditions">' + "".join(
                f'<label class="choice"><input type="checkbox" name="{field}" '
                f'value="{esc(condition)}"{" checked" if condition in chosen else ""}> '
                f'{esc(condition)}</label>' for condition in names) + "</span>"
        else:
            shown = "" if value is None else value
            if isinstance(shown, float) and shown.is_integer():
                shown = int(shown)
            control = f'<input id="field-{field}" name="{field}" value="{esc(shown)}">'
        rows.append(_row(field, control, errors.get(field, ()), origins.get(field)))
    other = [text for key, texts in errors.items()
             if key not in (*editing.MILTER_FIELDS, "name") for text in texts]
    button = '<button type="submit">Check and show the change</button>' if not disabled else ""
    return (f'{STYLE}{_readonly_note(request)}{_general([*general, *other])}'
            f'<form class="milter" method="post" action="{esc(action)}">{csrf_field(request)}'
            f'{_hidden("file_sha256", file_hash)}<fieldset{disabled}>{"".join(rows)}</fieldset>'
            f'{button} <a href="/edit">Back</a></form>')


class MilterDirectory(resource.Resource):
    def __init__(self, app):
        super().__init__()
        self.app = app

    def getChild(self, path, request):
        try:
            name = path.decode("utf-8")
        except UnicodeDecodeError:
            return resource.ErrorPage(400, "Bad request", "a milter name is UTF-8 text")
        return MilterPage(self.app, name)


class MilterPage(_Page):
    def __init__(self, app, name):
        super().__init__(app)
        self.name = name

    def _known(self, state):
        if state.milter(self.name) is None:
            raise editing.EditRefused(f"there is no child milter {self.name!r}")

    @_guarded
    def render_GET(self, request):
        editor = self.editor
        file_hash = editor.file_hash()
        state, configuration, _ = editor.state()
        self._known(state)
        milter = configuration.milter(self.name)
        body = _milter_form(request, request.path.decode("ascii", "replace"),
                            state.milter(self.name), list(configuration.conditions), file_hash,
                            origins=milter.origins)
        return page(request, f"Child milter {self.name}", body, active="/edit")

    @_guarded
    def render_POST(self, request):
        editor = self.editor
        file_hash = _arg(request, "file_sha256")
        state, configuration, _ = editor.state()
        self._known(state)
        values = editing.form_values(_args(request))
        proposal = editor.propose_milter(_user(request), file_hash, self.name, values)
        if proposal.ok:
            return _proposal_page(request, editor, proposal,
                                  request.path.decode("ascii", "replace"))
        request.setResponseCode(400)
        body = _milter_form(request, request.path.decode("ascii", "replace"), values,
                            list(configuration.conditions), file_hash,
                            proposal.checked.of(self.name), proposal.checked.general)
        return page(request, f"Child milter {self.name}", body, active="/edit")


class NewMilterPage(_Page):
    DEFAULTS = {"enabled": True, "evaluation_mode": False, "fallback_status": "accept",
                "applicable_conditions": [], "connection_spec": "",
                "connection_timeout": 297, "writing_timeout": 7, "reading_timeout": 7,
                "end_of_message_timeout": 297, "description": None}

    @_guarded
    def render_GET(self, request):
        editor = self.editor
        file_hash = editor.file_hash()
        _, configuration, _ = editor.state()
        body = _milter_form(request, "/edit/new", self.DEFAULTS, list(configuration.conditions),
                            file_hash, new=True)
        return page(request, "Add a child milter", body, active="/edit")

    @_guarded
    def render_POST(self, request):
        editor = self.editor
        file_hash = _arg(request, "file_sha256")
        name = _arg(request, "name", "").strip()
        _, configuration, _ = editor.state()
        values = editing.form_values(_args(request))
        proposal = editor.propose_milter(_user(request), file_hash, name, values, new=True)
        if proposal.ok:
            return _proposal_page(request, editor, proposal, "/edit/new")
        request.setResponseCode(400)
        errors = proposal.checked.of(name)
        body = _milter_form(request, "/edit/new", values, list(configuration.conditions),
                            file_hash, errors, proposal.checked.general, new=True, name=name)
        return page(request, "Add a child milter", body, active="/edit")


class RemovePage(_Page):
    @_guarded
    def render_POST(self, request):
        name = _arg(request, "name")
        proposal = self.editor.propose_removal(_user(request), _arg(request, "file_sha256"),
                                               name)
        if not proposal.ok:
            request.setResponseCode(400)
            return page(request, f"Remove {name}", STYLE + _general(
                [*proposal.checked.general,
                 *(text for texts in proposal.checked.errors.values() for text in texts)]),
                active="/edit")
        return _proposal_page(request, self.editor, proposal, "/edit")


# ---------------------------------------------------------------- the lists


class ListsPage(_Page):
    def _form(self, request, texts, file_hash, errors=None, general=(), trust_editable=True):
        errors = errors or {}
        disabled = "" if _is_admin(request) else " disabled"
        rows = []
        for field in editing.LIST_FIELDS:
            if field == "trust_domains" and not trust_editable:
                rows.append(_row(field, '<p class="note">The trusted domains include a '
                                        'function, which the page cannot write back: edit '
                                        'them in the files.</p>'))
                continue
            rows.append(_row(field, f'<textarea id="field-{field}" name="{field}" rows="6" '
                                    f'cols="60">{esc(texts.get(field, ""))}</textarea>',
                             errors.get(field, ())))
        button = '<button type="submit">Check and show the change</button>' if not disabled else ""
        return (f'{STYLE}{_readonly_note(request)}{_general(general)}'
                f'<p class="note">S25R\'s lists can only grow here: the language has no verb '
                f'that removes the main files\' entries.</p>'
                f'<form class="lists" method="post" action="/edit/lists">{csrf_field(request)}'
                f'{_hidden("file_sha256", file_hash)}<fieldset{disabled}>{"".join(rows)}'
                f'</fieldset>{button} <a href="/edit">Back</a></form>')

    @_guarded
    def render_GET(self, request):
        editor = self.editor
        file_hash = editor.file_hash()
        state, _, _ = editor.state()
        texts = {
            "dnsbl_services": editing.services_text(state.dnsbl_services),
            "trust_domains": editing.list_text(state.trust_domains or []),
            "s25r_whitelist": editing.list_text(state.s25r_whitelist),
            "s25r_blacklist": editing.list_text(state.s25r_blacklist),
        }
        body = self._form(request, texts, file_hash,
                          trust_editable=state.trust_domains is not None)
        return page(request, "Condition helpers' lists", body, active="/edit")

    @_guarded
    def render_POST(self, request):
        editor = self.editor
        file_hash = _arg(request, "file_sha256")
        texts = {field: _arg(request, field, "") for field in editing.LIST_FIELDS
                 if request.args.get(field.encode("ascii"))}
        proposal = editor.propose_lists(
            _user(request), file_hash, *(texts.get(field) for field in editing.LIST_FIELDS))
        if proposal.ok:
            return _proposal_page(request, editor, proposal, "/edit/lists")
        request.setResponseCode(400)
        body = self._form(request, texts, file_hash, proposal.checked.of(editing.LISTS),
                          proposal.checked.general)
        return page(request, "Condition helpers' lists", body, active="/edit")


# ---------------------------------------------------------------- confirm, history, undo


class ConfirmPage(_Page):
    @_guarded
    def render_POST(self, request):
        token = _arg(request, "token")
        file_hash = _arg(request, "file_sha256")
        user = _user(request)
        gone = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def done(problem):
            if problem is None:
                return page(request, "Changed", f'{STYLE}<p class="success" role="status">'
                            f'The change is written and in use.</p><p><a href="/edit">Back to '
                            f'the configuration editor</a> · <a href="/edit/history">History'
                            f'</a></p>', active="/edit")
            return _message(request, 409, "Not changed", problem)

        def refused(failure):
            failure.trap(editing.EditRefused)
            return _message(request, 409, "Not changed", failure.getErrorMessage())

        def unexpected(failure):
            self.log.failure("[web][edit][error] writing the change failed", failure)
            return _message(request, 500, "Not changed",
                            "Writing the change failed; the manager's log says why.")

        def send(body):
            if not gone:
                request.write(body)
                request.finish()

        d = defer.maybeDeferred(self.editor.apply, user, token, file_hash)
        d.addCallbacks(done, refused).addErrback(unexpected).addCallback(send)
        return server.NOT_DONE_YET


class HistoryPage(_Page):
    @_guarded
    def render_GET(self, request):
        editor = self.editor
        file_hash = editor.file_hash()
        admin = _is_admin(request)
        rows = []
        for entry in editor.versions():
            undo = ""
            if admin:
                undo = (f'<form class="undo" method="post" action="/edit/undo">'
                        f'{csrf_field(request)}{_hidden("file_sha256", file_hash)}'
                        f'{_hidden("version", entry["id"])}<button type="submit">'
                        f'Undo: put this version back</button></form>')
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(entry["time"]))
            kind = " (no file)" if entry["absent"] else ""
            rows.append(f'<tr data-version="{entry["id"]}"><td>{entry["id"]}{kind}</td>'
                        f'<td>{esc(when)}</td><td>{esc(entry["user"])}</td>'
                        f'<td>{esc(entry["summary"])}</td><td>{undo}</td></tr>')
        table = ('<table class="history"><thead><tr><th>Version</th><th>Replaced at</th>'
                 '<th>By</th><th>The change that replaced it</th><th></th></tr></thead><tbody>'
                 + "".join(rows) + "</tbody></table>") if rows else "<p>No version kept yet.</p>"
        limit = editor.service.configuration.web.custom_versions
        body = (f'{STYLE}{_readonly_note(request)}<p>The file as it was before each of the '
                f'last {limit} changes (web.custom_versions).</p>{table}'
                f'<p><a href="/edit">Back</a></p>')
        return page(request, "History of milter-manager.custom.conf", body, active="/edit")


class UndoPage(_Page):
    @_guarded
    def render_POST(self, request):
        text = _arg(request, "version")
        if not text.isdigit():
            raise BadRequest(f"a version is a number; got {text!r}")
        proposal = self.editor.propose_undo(_user(request), _arg(request, "file_sha256"),
                                            int(text))
        if not proposal.ok:
            request.setResponseCode(409)
            return page(request, "Undo", STYLE + _general(proposal.checked.general + [
                text for texts in proposal.checked.errors.values() for text in texts]),
                active="/edit")
        return _proposal_page(request, self.editor, proposal, "/edit/history")
