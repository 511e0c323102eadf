"""/login and /logout.

A wrong password counts against the client's address (auth.RateLimiter);
once the limit is reached the login form answers 429 without checking
anything until the window passes.
"""

from twisted.logger import Logger
from twisted.web import resource

from .auth import COOKIE, PasswordFileError
from .guard import client_address
from .templates import esc, page


def install(app, root):
    root.putChild(b"login", LoginPage(app))
    root.putChild(b"logout", LogoutPage(app))


def _form(request, message=""):
    note = f'<p class="error" role="alert">{esc(message)}</p>' if message else ""
    return page(request, "Log in", f"""{note}
<form class="login" method="post" action="/login">
<label>User <input name="user" autocomplete="username" required autofocus></label>
<label>Password <input name="password" type="password" autocomplete="current-password" required></label>
<button type="submit">Log in</button>
</form>""")


class LoginPage(resource.Resource):
    isLeaf = True
    log = Logger()

    def __init__(self, app):
        super().__init__()
        self.app = app

    def render_GET(self, request):
        return _form(request)

    def render_POST(self, request):
        address = client_address(request)
        limiter = self.app.auth.limiter
        if limiter.refused(address):
            wait = limiter.retry_after(address)
            request.setResponseCode(429)
            request.setHeader(b"retry-after", b"%d" % wait)
            return _form(request, f"Too many wrong passwords from {address}: try again in "
                                  f"{wait} seconds.")
        try:
            name = request.args.get(b"user", [b""])[0].decode("utf-8")
            password = request.args.get(b"password", [b""])[0].decode("utf-8")
        except UnicodeDecodeError:
            request.setResponseCode(400)
            return _form(request, "The user name and the password must be UTF-8 text.")
        if not name or not password:
            request.setResponseCode(400)
            return _form(request, "Give a user name and a password.")
        try:
            user = self.app.auth.check(name, password)
        except PasswordFileError as error:
            self.log.error("[web][login][error] {error}", error=str(error))
            request.setResponseCode(503)
            return _form(request, "The user list cannot be read; the manager's log says why.")
        if user is None:
            limiter.failed(address)
            self.log.warn("[web][login][failed] {user!r} from {address}", user=name,
                          address=address)
            request.setResponseCode(401)
            return _form(request, "Wrong user name or password.")
        session = self.app.auth.log_in(user)
        secure = request.isSecure()
        request.addCookie(COOKIE, session.encode("ascii"), path=b"/", httpOnly=True,
                          secure=secure, sameSite=b"Strict")
        self.log.info("[web][login] {user} ({role}) from {address}", user=user.name,
                      role=user.role, address=address)
        request.setResponseCode(303)
        request.setHeader(b"location", b"/")
        return b""


class LogoutPage(resource.Resource):
    isLeaf = True

    def __init__(self, app):
        super().__init__()
        self.app = app

    def render_POST(self, request):
        session = request.getCookie(COOKIE)
        if session:
            self.app.auth.log_out(session.decode("ascii", "replace"))
        request.addCookie(COOKIE, b"", path=b"/", httpOnly=True, secure=request.isSecure(),
                          sameSite=b"Strict", max_age=b"0")
        request.setResponseCode(303)
        request.setHeader(b"location", b"/login")
        return b""
