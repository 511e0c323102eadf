"""The web endpoint's guard over real HTTP(S): logins, CSRF, roles, rate limit, /metrics, headers."""

import base64
import io
import os
import subprocess
from urllib.parse import urlencode

from twisted.internet import defer, reactor, ssl
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from twisted.web import client, resource
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from miltermanager import config
from miltermanager.service import ManagerService
from miltermanager.web import app, auth, guard

CSP = (b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       b"frame-ancestors 'none'; form-action 'self'; base-uri 'none'")
PUBLIC_PATHS = (b"/login", b"/static")


@implementer(IPolicyForHTTPS)
class TrustOnly:
    """Agent policy: HTTPS to anything whose certificate is this one (self-signed)."""

    def __init__(self, pem):
        self.root = ssl.Certificate.loadPEM(pem)

    def creatorForNetloc(self, hostname, port):
        return ssl.optionsForClientTLS(hostname.decode("ascii"), trustRoot=self.root)


def walk(node, prefix=b""):
    """Every path of the resource tree under node, through the children of non-leaf resources."""
    for name, child in sorted(node.children.items()):
        path = prefix + b"/" + name
        yield path
        if not getattr(child, "isLeaf", True):
            yield from walk(child, path)


class Response:
    def __init__(self, response, body):
        self.code = response.code
        self.headers = response.headers
        self.body = body

    def header(self, name):
        return self.headers.getRawHeaders(name, [None])[0]

    def __repr__(self):
        return f"Response({self.code}, {self.body[:120]!r})"


class GuardTestsMixin:
    """A ManagerService's web endpoint on a loopback port, with two users."""

    scheme = "http"
    tls_files = None

    @defer.inlineCallbacks
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.mkdir(self.directory)
        self.password_file = os.path.join(self.directory, "web-users")
        auth.add_user(self.password_file, "alice", "alice-password", "admin")
        auth.add_user(self.password_file, "reader", "reader-password", "read-only")
        configuration = config.default()
        configuration.manager.connection_spec = "inet:0@[127.0.0.1]"
        web = configuration.web
        web.connection_spec = "inet:0@[127.0.0.1]"
        web.password_file = self.password_file
        if self.tls_files:
            web.tls_certificate, web.tls_key = self.make_certificate()
        self.service = ManagerService(reactor, configuration)
        self.endpoint = yield app.start(self.service, reactor, web)
        self.addCleanup(self.endpoint.stop)
        self.app = self.endpoint.app
        self.port = self.endpoint.port.getHost().port
        pool = client.HTTPConnectionPool(reactor, persistent=False)
        if self.tls_files:
            with open(web.tls_certificate, "rb") as stream:
                self.agent = client.Agent(reactor, TrustOnly(stream.read()), pool=pool)
        else:
            self.agent = client.Agent(reactor, pool=pool)
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def make_certificate(self):
        certificate = os.path.join(self.directory, "cert.pem")
        key = os.path.join(self.directory, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                        key, "-out", certificate, "-days", "2", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                       check=True, capture_output=True, timeout=60)
        return certificate, key

    @defer.inlineCallbacks
    def fetch(self, path, method=b"GET", form=None, session=None, headers=None):
        """One request; form is a dict sent as application/x-www-form-urlencoded."""
        url = f"{self.scheme}://127.0.0.1:{self.port}".encode("ascii") + path
        sent = Headers({name: [value] for name, value in (headers or {}).items()})
        if session is not None:
            sent.addRawHeader(b"cookie", auth.COOKIE + b"=" + session.encode("ascii"))
        body = None
        if form is not None:
            sent.addRawHeader(b"content-type", b"application/x-www-form-urlencoded")
            body = client.FileBodyProducer(io.BytesIO(urlencode(form).encode("utf-8")))
        response = yield self.agent.request(method, url, sent, body)
        data = yield client.readBody(response)
        return Response(response, data)

    @defer.inlineCallbacks
    def log_in(self, name="alice", password="alice-password"):
        """(session id, CSRF token) of a new login."""
        response = yield self.fetch(b"/login", b"POST", {"user": name, "password": password})
        self.assertEqual(response.code, 303, response)
        cookie = response.header(b"set-cookie")
        session = cookie.split(b";")[0].split(b"=", 1)[1].decode("ascii")
        return session, self.app.auth.logins[session].csrf

    def state(self):
        """What a request could change: the files beside the password file, the logins."""
        files = {}
        for name in sorted(os.listdir(self.directory)):
            with open(os.path.join(self.directory, name), "rb") as stream:
                files[name] = stream.read()
        return files, id(self.service.configuration), sorted(self.app.auth.logins)

    def paths(self):
        """Every page and action: the tree's paths plus an unknown one."""
        return [*walk(self.endpoint.site.resource), b"/", b"/no-such-page"]

    def guarded(self):
        return [path for path in self.paths()
                if not path.startswith(PUBLIC_PATHS) and path != b"/metrics"]

    def lines(self, tag):
        return [event["log_format"].format(**event) for event in self.logged
                if tag in event.get("log_format", "")]


class GuardTests(GuardTestsMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_every_page_needs_a_login(self):
        """Without a session every page redirects a GET to /login and refuses a POST (403)."""
        paths = self.guarded()
        self.assertIn(b"/logout", paths)
        before = self.state()
        for path in paths:
            response = yield self.fetch(path)
            self.assertEqual((response.code, response.header(b"location")), (303, b"/login"),
                             path)
            response = yield self.fetch(path, b"HEAD")
            self.assertEqual(response.code, 303, path)
            response = yield self.fetch(path, b"POST", {"csrf": "x"})
            self.assertEqual(response.code, 403, path)
            self.assertIn(b"log in first", response.body)
        self.assertEqual(self.state(), before)

    @defer.inlineCallbacks
    def test_bad_session_cookie(self):
        """An unknown or undecodable session cookie is no login: a redirect, not an error."""
        for cookie in (b"nonsense", b"\xff\xfe", b""):
            response = yield self.fetch(b"/", headers={b"cookie": auth.COOKIE + b"=" + cookie})
            self.assertEqual(response.code, 303, cookie)

    @defer.inlineCallbacks
    def test_post_without_or_with_wrong_csrf(self):
        """A POST with a session but no or a wrong CSRF token is 403 and changes nothing."""
        session, csrf = yield self.log_in()
        before = self.state()
        for path in self.guarded():
            for form in ({}, {"csrf": ""}, {"csrf": csrf + "x"}, {"csrf": csrf[:-1]}):
                response = yield self.fetch(path, b"POST", form, session=session)
                self.assertEqual(response.code, 403, (path, form))
                self.assertIn(b"CSRF", response.body)
        self.assertEqual(self.state(), before)
        self.assertIsNotNone(self.app.auth.login_of(session))  # /logout did not log out

    @defer.inlineCallbacks
    def test_csrf_token_of_another_login(self):
        """The CSRF token of another login does not pass."""
        session, _ = yield self.log_in()
        _, other = yield self.log_in()
        response = yield self.fetch(b"/logout", b"POST", {"csrf": other}, session=session)
        self.assertEqual(response.code, 403)
        self.assertIsNotNone(self.app.auth.login_of(session))

    @defer.inlineCallbacks
    def test_read_only_user_cannot_change_anything(self):
        """A read-only user's POSTs with the right token are 403 everywhere but /logout."""
        session, csrf = yield self.log_in("reader", "reader-password")
        before = self.state()
        for path in self.guarded():
            if path == b"/logout":
                continue
            response = yield self.fetch(path, b"POST", {"csrf": csrf}, session=session)
            self.assertEqual(response.code, 403, path)
            self.assertIn(b"read-only", response.body)
        self.assertEqual(self.state(), before)
        response = yield self.fetch(b"/logout", b"POST", {"csrf": csrf}, session=session)
        self.assertEqual((response.code, response.header(b"location")), (303, b"/login"))
        self.assertIsNone(self.app.auth.login_of(session))

    @defer.inlineCallbacks
    def test_logout_ends_the_session(self):
        """After logging out the cookie is cleared and the old session id opens nothing."""
        session, csrf = yield self.log_in()
        response = yield self.fetch(b"/logout", b"POST", {"csrf": csrf}, session=session)
        self.assertEqual(response.code, 303)
        self.assertIn(b"Max-Age=0", response.header(b"set-cookie"))
        response = yield self.fetch(b"/no-such-page", session=session)
        self.assertEqual(response.code, 303)

    @defer.inlineCallbacks
    def test_sixth_wrong_password_refused(self):
        """Five wrong passwords are 401; the sixth attempt is 429 even with the right password."""
        for _ in range(5):
            response = yield self.fetch(b"/login", b"POST",
                                        {"user": "alice", "password": "wrong"})
            self.assertEqual(response.code, 401)
            self.assertIn(b"Wrong user name or password.", response.body)
        response = yield self.fetch(b"/login", b"POST",
                                    {"user": "alice", "password": "alice-password"})
        self.assertEqual(response.code, 429)
        self.assertIn(b"Too many wrong passwords from 127.0.0.1", response.body)
        self.assertIsNone(response.header(b"set-cookie"))
        self.assertTrue(0 < int(response.header(b"retry-after")) <= 60)
        self.assertEqual(self.app.auth.logins, {})
        self.assertEqual(len(self.lines("[web][login][limited]")), 1)
        self.assertTrue(self.lines("[web][login][limited]")[0].startswith(
            "[web][login][limited] 127.0.0.1: 5 wrong passwords within 60 s"))

    @defer.inlineCallbacks
    def test_bad_login_form(self):
        """A login form that is not UTF-8 or lacks a field is 400 with a message."""
        response = yield self.fetch(b"/login", b"POST", {"user": "alice"})
        self.assertEqual(response.code, 400)
        self.assertIn(b"Give a user name and a password.", response.body)
        response = yield self.agent.request(
            b"POST", f"http://127.0.0.1:{self.port}/login".encode(),
            Headers({b"content-type": [b"application/x-www-form-urlencoded"]}),
            client.FileBodyProducer(io.BytesIO(b"user=%ff&password=%fe")))
        body = yield client.readBody(response)
        self.assertEqual(response.code, 400)
        self.assertIn(b"must be UTF-8", body)

    @defer.inlineCallbacks
    def test_metrics_needs_login_or_basic_auth(self):
        """/metrics: 401 with a Basic challenge, 200 with basic auth or a session."""
        response = yield self.fetch(b"/metrics")
        self.assertEqual(response.code, 401)
        self.assertEqual(response.header(b"www-authenticate"), b'Basic realm="milter-manager"')
        self.assertNotIn(b"milter_manager", response.body)
        good = b"Basic " + base64.b64encode(b"reader:reader-password")
        response = yield self.fetch(b"/metrics", headers={b"authorization": good})
        self.assertEqual(response.code, 200)
        self.assertIn(b"milter_manager_sessions_total", response.body)
        for bad in (b"Basic " + base64.b64encode(b"reader:nope"), b"Basic !!!",
                    b"Basic " + base64.b64encode(b"no-colon"), b"Bearer abc"):
            response = yield self.fetch(b"/metrics", headers={b"authorization": bad})
            self.assertEqual(response.code, 401, bad)
            self.assertEqual(response.header(b"www-authenticate"),
                             b'Basic realm="milter-manager"')
        session, _ = yield self.log_in()
        response = yield self.fetch(b"/metrics", session=session)
        self.assertEqual(response.code, 200)

    @defer.inlineCallbacks
    def test_basic_auth_failures_count_in_the_limit(self):
        """Wrong basic-auth passwords count: then even a right login or scrape is 429."""
        bad = b"Basic " + base64.b64encode(b"reader:nope")
        for _ in range(5):
            response = yield self.fetch(b"/metrics", headers={b"authorization": bad})
            self.assertEqual(response.code, 401)
        good = b"Basic " + base64.b64encode(b"reader:reader-password")
        response = yield self.fetch(b"/metrics", headers={b"authorization": good})
        self.assertEqual(response.code, 429)
        response = yield self.fetch(b"/login", b"POST",
                                    {"user": "alice", "password": "alice-password"})
        self.assertEqual(response.code, 429)

    @defer.inlineCallbacks
    def test_metrics_without_login(self):
        """web.metrics_without_login = True serves /metrics to anyone; the pages still guarded."""
        self.service.configuration.web.metrics_without_login = True
        response = yield self.fetch(b"/metrics")
        self.assertEqual(response.code, 200)
        self.assertIn(b"milter_manager_sessions_total", response.body)
        response = yield self.fetch(b"/")
        self.assertEqual(response.code, 303)

    @defer.inlineCallbacks
    def test_cookie_flags(self):
        """The session cookie is HttpOnly, SameSite=Strict, path /, and not Secure over HTTP."""
        response = yield self.fetch(b"/login", b"POST",
                                    {"user": "alice", "password": "alice-password"})
        cookie = response.header(b"set-cookie")
        self.assertTrue(cookie.startswith(auth.COOKIE + b"="))
        self.assertIn(b"HttpOnly", cookie)
        self.assertIn(b"samesite=strict", cookie.lower())  # Twisted writes "strict"
        self.assertIn(b"Path=/", cookie)
        self.assertNotIn(b"Secure", cookie)
        self.assertIsNone(response.header(b"strict-transport-security"))

    @defer.inlineCallbacks
    def test_security_headers_everywhere(self):
        """Every answer carries the security headers; no-store except under /static/."""
        session, _ = yield self.log_in()
        answers = []
        for path in (b"/login", b"/", b"/metrics", b"/no-such-page"):
            answers.append((path, (yield self.fetch(path))))
            answers.append((path, (yield self.fetch(path, session=session))))
        answers.append((b"/logout", (yield self.fetch(b"/logout", b"POST", {}))))
        for path, response in answers:
            self.assertEqual(response.header(b"content-security-policy"), CSP, path)
            self.assertEqual(response.header(b"x-frame-options"), b"DENY", path)
            self.assertEqual(response.header(b"x-content-type-options"), b"nosniff", path)
            self.assertEqual(response.header(b"referrer-policy"), b"same-origin", path)
            self.assertEqual(response.header(b"cache-control"), b"no-store", path)
        response = yield self.fetch(b"/static/style.css")
        self.assertEqual(response.header(b"content-security-policy"), CSP)
        self.assertNotEqual(response.header(b"cache-control"), b"no-store")

    @defer.inlineCallbacks
    def test_unknown_path_is_a_plain_404_after_login(self):
        """An unknown path: a redirect without a login, a plain-text 404 with one."""
        response = yield self.fetch(b"/no-such-page/deeper")
        self.assertEqual(response.code, 303)
        session, _ = yield self.log_in()
        response = yield self.fetch(b"/no-such-page/deeper", session=session)
        self.assertEqual(response.code, 404)
        self.assertEqual(response.header(b"content-type"), b"text/plain; charset=utf-8")
        self.assertEqual(response.body, b"404 Not Found: no such page\n")

    @defer.inlineCallbacks
    def test_page_that_raises_is_a_plain_500(self):
        """A page raising while rendering or finding a child: a plain 500, one log line."""

        class Broken(resource.Resource):
            def render_GET(self, request):
                raise RuntimeError("secret detail")

            def getChild(self, path, request):
                raise RuntimeError("secret detail")

        self.endpoint.site.resource.putChild(b"broken", Broken())
        session, _ = yield self.log_in()
        for path in (b"/broken", b"/broken/child"):
            response = yield self.fetch(path, session=session)
            self.assertEqual(response.code, 500, path)
            self.assertEqual(response.body, b"500 Internal Server Error: the page failed; "
                             b"the manager's log says why\n")
            self.assertEqual(response.header(b"content-security-policy"), CSP)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        self.assertEqual(self.lines("[web][error]"), [
            "[web][error] GET /broken: secret detail",
            "[web][error] GET /broken/child: secret detail"])
        response = yield self.fetch(b"/broken", b"PUT", {"csrf": "x"}, session=session)
        self.assertEqual(response.code, 403)

    @defer.inlineCallbacks
    def test_unsupported_method_is_405(self):
        """A method a page does not take is still 405, not a 500."""
        session, _ = yield self.log_in()
        response = yield self.fetch(b"/logout", session=session)
        self.assertEqual(response.code, 405)
        self.assertNotIn(b"Traceback", response.body)

    @defer.inlineCallbacks
    def test_unreadable_password_file(self):
        """A password file that went bad: 503 with a message, never a traceback."""
        session, _ = yield self.log_in()
        with open(self.password_file, "w") as stream:
            stream.write("garbage\n")
        response = yield self.fetch(b"/", session=session)
        self.assertEqual(response.code, 503)
        self.assertIn(b"user list cannot be read", response.body)
        response = yield self.fetch(b"/login", b"POST",
                                    {"user": "alice", "password": "alice-password"})
        self.assertEqual(response.code, 503)
        self.assertEqual(len(self.lines("[web][error]")) + len(self.lines("[login][error]")),
                         2)


class TLSTests(GuardTestsMixin, unittest.TestCase):
    scheme = "https"
    tls_files = True

    @defer.inlineCallbacks
    def test_https_cookie_secure_and_hsts(self):
        """Under TLS the cookie is Secure as well and responses carry HSTS."""
        response = yield self.fetch(b"/login")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.header(b"strict-transport-security"), b"max-age=31536000")
        response = yield self.fetch(b"/login", b"POST",
                                    {"user": "alice", "password": "alice-password"})
        self.assertEqual(response.code, 303)
        cookie = response.header(b"set-cookie")
        for flag in (b"secure", b"httponly", b"samesite=strict"):
            self.assertIn(flag, cookie.lower())
        response = yield self.fetch(b"/no-such-page")
        self.assertEqual(response.code, 303)

    @defer.inlineCallbacks
    def test_plain_http_gets_nothing(self):
        """A plain HTTP request to the HTTPS port gets no page."""
        agent = client.Agent(reactor, pool=client.HTTPConnectionPool(reactor, False))
        try:
            response = yield agent.request(b"GET", f"http://127.0.0.1:{self.port}/login".encode())
        except Exception:
            return  # the connection was closed: what a TLS server does
        body = yield client.readBody(response)
        self.assertNotIn(b"<form", body)


class TLSFileTests(unittest.TestCase):
    """web.tls_certificate / web.tls_key that cannot be used stop the start with one clear line."""

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.mkdir(self.directory)
        self.files = {}
        for name in ("one", "two"):
            certificate = os.path.join(self.directory, f"{name}-cert.pem")
            key = os.path.join(self.directory, f"{name}-key.pem")
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                            "-keyout", key, "-out", certificate, "-days", "2", "-subj",
                            f"/CN={name}"], check=True, capture_output=True, timeout=60)
            self.files[name] = certificate, key

    def start(self, certificate, key):
        configuration = config.default()
        configuration.manager.connection_spec = "inet:0@[127.0.0.1]"
        web = configuration.web
        web.connection_spec = "inet:0@[127.0.0.1]"
        web.password_file = os.path.join(self.directory, "users")
        web.tls_certificate, web.tls_key = certificate, key
        return app.start(ManagerService(reactor, configuration), reactor, web)

    def test_errors(self):
        """Missing, non-PEM and mismatched files are ValueErrors naming the setting and file."""
        one_cert, one_key = self.files["one"]
        two_cert, two_key = self.files["two"]
        missing = os.path.join(self.directory, "missing.pem")
        cases = [
            ((missing, one_key), f"web.tls_certificate {missing}: cannot read: No such file "
                                 "or directory"),
            ((one_cert, missing), f"web.tls_key {missing}: cannot read: No such file or "
                                  "directory"),
            ((one_key, one_key), f"web.tls_certificate {one_key}: no PEM certificate in it "
                                 "(-----BEGIN CERTIFICATE-----)"),
            ((one_cert, one_cert), f"web.tls_key {one_cert}: not a PEM private key (or one "
                                   "protected by a passphrase, which the manager cannot ask "
                                   "for)"),
            ((one_cert, two_key), f"web.tls_key {two_key}: does not match the certificate "
                                  f"{one_cert}"),
        ]
        for (certificate, key), text in cases:
            error = self.assertRaises(ValueError, self.start, certificate, key)
            self.assertEqual(str(error), text)

    def test_service_start_error(self):
        """Through the service, a bad TLS file is a StartError with that text."""
        from miltermanager.service import StartError

        configuration = config.default()
        configuration.manager.connection_spec = "inet:0@[127.0.0.1]"
        web = configuration.web
        web.connection_spec = "inet:0@[127.0.0.1]"
        web.password_file = os.path.join(self.directory, "users")
        web.tls_certificate, web.tls_key = self.files["one"][0], self.files["two"][1]
        made = ManagerService(reactor, configuration)
        error = self.assertRaises(StartError, made.privilegedStartService)
        self.addCleanup(made.stopService)
        self.assertIn("does not match the certificate", str(error))

    def test_chain_served(self):
        """A certificate file holding a chain (leaf first) is accepted."""
        one_cert, one_key = self.files["one"]
        chain = os.path.join(self.directory, "chain.pem")
        with open(chain, "wb") as out:
            for path in (one_cert, self.files["two"][0]):
                with open(path, "rb") as stream:
                    out.write(stream.read())
        from miltermanager.web import tls

        self.assertIsNotNone(tls.context_factory(chain, one_key).getContext())


class ClientAddressTests(unittest.SynchronousTestCase):
    def test_unix_socket_client(self):
        """A client on a UNIX socket is counted as "unix" by the rate limit."""
        from twisted.internet.address import UNIXAddress
        from twisted.web.test.requesthelper import DummyRequest

        request = DummyRequest([b""])
        request.client = UNIXAddress(None)
        self.assertEqual(guard.client_address(request), "unix")
