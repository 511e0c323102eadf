"""Every page behind a login: the root resource checks the session before any child runs.

A request without a valid login gets a redirect to /login (GET, HEAD) or
403 (anything else). A state-changing request (POST) must carry the
login's CSRF token as the form field "csrf" and comes from an admin
(logging out excepted), else 403 and nothing changes. /login and /static/ are open, and /metrics with
web.metrics_without_login.
"""

from twisted.web import resource

from .auth import COOKIE

PUBLIC = (b"login", b"static")


class Forbidden(resource.Resource):
    isLeaf = True

    def __init__(self, reason):
        super().__init__()
        self.reason = reason

    def render(self, request):
        request.setResponseCode(403)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return f"403 Forbidden: {self.reason}\n".encode("utf-8")


class Redirect(resource.Resource):
    isLeaf = True

    def __init__(self, location):
        super().__init__()
        self.location = location

    def render(self, request):
        request.setResponseCode(303)
        request.setHeader(b"location", self.location)
        return b""


class GuardedRoot(resource.Resource):
    """The root: its children are the pages; getChildWithDefault lets a request through or not."""

    def __init__(self, app):
        super().__init__()
        self.app = app

    def getChildWithDefault(self, path, request):
        request.web_user = None
        request.web_csrf = ""
        if path == b"metrics" and self.app.settings.metrics_without_login:
            return super().getChildWithDefault(path, request)
        if not self.app.pages:
            return Forbidden("only /metrics is served: the web pages need web.password_file")
        if path in PUBLIC:
            return super().getChildWithDefault(path, request)
        session = request.getCookie(COOKIE)
        login = self.app.auth.login_of(session.decode("ascii", "replace")) if session else None
        if login is None:
            if request.method in (b"GET", b"HEAD"):
                return Redirect(b"/login")
            return Forbidden("log in first")
        request.web_user = login.user
        request.web_csrf = login.csrf
        if request.method not in (b"GET", b"HEAD"):
            sent = request.args.get(b"csrf", [b""])[0]
            if not sent or sent.decode("ascii", "replace") != login.csrf:
                return Forbidden("the form's CSRF token is missing or wrong; reload the page")
            if not login.user.is_admin and path != b"logout":
                return Forbidden(f"{login.user.name} may only read (role read-only)")
        return super().getChildWithDefault(path, request)
