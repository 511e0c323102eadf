"""Every page behind a login: the root resource checks the session before any child runs.

A request without a valid login gets a redirect to /login (GET, HEAD) or
403 (anything else). A state-changing request (POST) must carry the
login's CSRF token as the form field "csrf" and comes from an admin
(logging out excepted), else 403 and nothing changes. /login and /static/
are open. /metrics takes a login, or HTTP basic auth as any web user
(401 with a challenge otherwise), or nothing with web.metrics_without_login.

Every response gets the security headers (HEADERS; no-store caching but
for /static/, HSTS under TLS) before its page renders. An unknown path is
a plain 404 once the login is checked; a page that raises gives a plain
500 and one log line, never a traceback.
"""

import base64
import binascii

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource
from twisted.web.error import UnsupportedMethod
from zope.interface import alsoProvides

from .auth import COOKIE, PasswordFileError

PUBLIC = (b"login", b"static")
HEADERS = (
    (b"content-security-policy",
     b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
     b"frame-ancestors 'none'; form-action 'self'; base-uri 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
)
HSTS = b"max-age=31536000"
REALM = b'Basic realm="milter-manager"'


class Plain(resource.Resource):
    """A short text/plain answer with a status code (and extra headers)."""

    isLeaf = True

    def __init__(self, code, text, headers=()):
        super().__init__()
        self.code = code
        self.text = text
        self.headers = headers

    def render(self, request):
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        for name, value in self.headers:
            request.setHeader(name, value)
        return f"{self.text}\n".encode("utf-8")


class Forbidden(Plain):
    def __init__(self, reason):
        super().__init__(403, f"403 Forbidden: {reason}")


class NotFound(Plain):
    def __init__(self):
        super().__init__(404, "404 Not Found: no such page")


class Unavailable(Plain):
    def __init__(self):
        super().__init__(503, "503 Service Unavailable: the user list cannot be read; the "
                              "manager's log says why")


class Redirect(resource.Resource):
    isLeaf = True

    def __init__(self, location):
        super().__init__()
        self.location = location

    def render(self, request):
        request.setResponseCode(303)
        request.setHeader(b"location", self.location)
        return b""


class Safe:
    """A page as the site sees it: an exception while finding or rendering it is a plain 500.

    It wraps the children it finds as well, so the whole tree under the
    root is covered; a page's own Deferreds remain its own business.
    """

    def __init__(self, inner):
        self.inner = inner
        self.isLeaf = getattr(inner, "isLeaf", True)
        if resource._IEncodingResource.providedBy(inner):  # gzip wrappers keep working
            alsoProvides(self, resource._IEncodingResource)
            self.getEncoder = inner.getEncoder

    def getChildWithDefault(self, path, request):
        try:
            return Safe(self.inner.getChildWithDefault(path, request))
        except Exception:
            return _Failed(Failure())

    def render(self, request):
        try:
            return self.inner.render(request)
        except UnsupportedMethod:
            raise  # the site answers 405 with the allowed methods
        except Exception:
            return _Failed(Failure()).render(request)


class _Failed(resource.Resource):
    isLeaf = True
    log = Logger()

    def __init__(self, failure):
        super().__init__()
        self.failure = failure

    def render(self, request):
        self.log.failure("[web][error] {method} {path}: {error}", failure=self.failure,
                         method=request.method.decode("ascii", "replace"),
                         path=request.uri.decode("ascii", "replace")[:200],
                         error=self.failure.getErrorMessage())
        request.setResponseCode(500)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"500 Internal Server Error: the page failed; the manager's log says why\n"


def client_address(request):
    """The client's address as the rate limit counts it ("unix" for a UNIX socket)."""
    return getattr(request.getClientAddress(), "host", None) or "unix"


def basic_credentials(request):
    """(name, password) of an Authorization: Basic header, None without one, ValueError if bad."""
    header = request.getHeader(b"authorization")
    if header is None:
        return None
    scheme, _, encoded = header.strip().partition(b" ")
    if scheme.lower() != b"basic":
        raise ValueError("only Basic authorization is accepted")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise ValueError("the Basic credentials are not base64 of UTF-8 NAME:PASSWORD") \
            from None
    name, colon, password = decoded.partition(":")
    if not colon:
        raise ValueError("the Basic credentials are not NAME:PASSWORD")
    return name, password


class GuardedRoot(resource.Resource):
    """The root: its children are the pages; getChildWithDefault lets a request through or not."""

    log = Logger()

    def __init__(self, app):
        super().__init__()
        self.app = app

    def getChildWithDefault(self, path, request):
        for name, value in HEADERS:
            request.setHeader(name, value)
        if path != b"static":
            request.setHeader(b"cache-control", b"no-store")
        if request.isSecure():
            request.setHeader(b"strict-transport-security", HSTS)
        request.web_user = None
        request.web_csrf = ""
        try:
            return Safe(self._guarded(path, request))
        except PasswordFileError as error:
            self.log.error("[web][error] {error}", error=str(error))
            return Unavailable()

    def getChild(self, path, request):
        return NotFound()

    def render(self, request):
        # Only reached for a request without any path ("GET http://host" proxies): no page.
        return NotFound().render(request)

    def _guarded(self, path, request):
        if path == b"metrics" and self.app.settings.metrics_without_login:
            return super().getChildWithDefault(path, request)
        if not self.app.pages:
            return Forbidden("only /metrics is served: the web pages need web.password_file")
        if path in PUBLIC:
            return super().getChildWithDefault(path, request)
        session = request.getCookie(COOKIE)
        login = self.app.auth.login_of(session.decode("ascii", "replace")) if session else None
        if login is None:
            if path == b"metrics":
                return self._basic_auth(path, request)
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

    def _basic_auth(self, path, request):
        """/metrics for HTTP basic auth as any web user (scrapers); 401 or 429 otherwise."""
        challenge = ((b"www-authenticate", REALM),)
        try:
            credentials = basic_credentials(request)
        except ValueError as error:
            return Plain(401, f"401 Unauthorized: {error}", challenge)
        if credentials is None:
            return Plain(401, "401 Unauthorized: log in, or use HTTP basic auth as a web user",
                         challenge)
        limiter, address = self.app.auth.limiter, client_address(request)
        if limiter.refused(address):
            return Plain(429, "429 Too Many Requests: too many wrong passwords from "
                              f"{address}; try again in {limiter.retry_after(address)} s",
                         ((b"retry-after", b"%d" % limiter.retry_after(address)),))
        user = self.app.auth.check_basic(*credentials)
        if user is None:
            limiter.failed(address)
            self.log.warn("[web][metrics][failed] {user!r} from {address}",
                          user=credentials[0], address=address)
            return Plain(401, "401 Unauthorized: wrong user name or password", challenge)
        request.web_user = user
        return super().getChildWithDefault(path, request)
