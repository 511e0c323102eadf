"""The web endpoint: one twisted.web Site whose pages share one WebApp.

WebApp holds what the pages read and change: the running service (its
configuration, reload, controller status and trace), the users and their
logins (auth), the recent activity (an event-stream observer) and the
configuration editor. build_root() puts every page under the guard,
which lets a request through only with a login (and, for a change, the
admin role and the form's CSRF token); see guard.py.

Request attributes the guard sets for the pages: request.web_user (an
auth.User: name, role) and request.web_csrf (the token every form that
changes something must carry as the field "csrf").
"""

from twisted.internet import defer

from ..metrics import Metrics, MetricsResource, QuietSite, listen, registry_for


class WebApp:
    """What the pages share. service: the ManagerService; clock: its reactor (or a task.Clock).

    scrape: the supervisor's WorkersScrape (manager.n_workers), whose
    /metrics are the workers' counts added up at each scrape; None: this
    process's own Metrics.
    """

    def __init__(self, service, clock, scrape=None):
        from . import activity, auth, editing

        self.service = service
        self.clock = clock
        self.scrape = scrape
        self.metrics = Metrics(service.factory) if scrape is None else scrape.collector.metrics
        # Without a password file only /metrics is served (web.metrics_without_login): no
        # page, and none of the pages' observers on the sessions' path.
        self.pages = service.configuration.web.password_file is not None
        self.auth = auth.Auth(lambda: self.settings, clock)
        self.activity = activity.Activity(clock) if self.pages else None
        self.editor = editing.Editor(service, clock) if self.pages else None

    @property
    def settings(self):
        """The web section of the configuration in use (reloads included)."""
        return self.service.configuration.web

    @property
    def controller(self):
        """The service's Controller: status, trace, reload (built whenever the web is on)."""
        return self.service.controller

    def observers(self):
        """The event-stream observers the web endpoint adds to the factory."""
        if self.scrape is not None:
            return []  # the supervisor serves no session: its workers count
        return [self.metrics, self.activity] if self.pages else [self.metrics]

    def root(self):
        """The Resource tree: every page behind the guard."""
        from . import auth_pages, edit_pages, guard, pages

        root = guard.GuardedRoot(self)
        if self.pages:
            auth_pages.install(self, root)
            pages.install(self, root)
            edit_pages.install(self, root)
        if self.scrape is not None:
            root.putChild(b"metrics", MetricsResource(self.scrape.registry, self.scrape.refresh))
        else:
            root.putChild(b"metrics", MetricsResource(registry_for(self.metrics)))
        return root


def start(service, reactor, settings, scrape=None):
    """Serve the web interface of service on settings.connection_spec (scrape: see WebApp).

    Fires with a WebEndpoint whose stop() undoes it; fails as listening does
    (CannotListenError) or with a StartError-worthy ValueError for TLS files
    that cannot be read.
    """
    from . import tls

    app = WebApp(service, reactor, scrape)
    site = QuietSite(app.root())
    factory = tls.wrap(settings, site)
    listening = listen(reactor, settings.connection_spec, factory)

    def listening_now(port):
        for observer in app.observers():
            service.factory.add_observer(observer)
        if scrape is None:
            app.metrics.start()
        return WebEndpoint(service.factory, app, site, port)

    return listening.addCallback(listening_now)


class WebEndpoint:
    """The running web endpoint: the app, its site (whose resource is the root), the port."""

    def __init__(self, factory, app, site, port):
        self.factory = factory
        self.app = app
        self.site = site
        self.port = port

    @property
    def metrics(self):
        return self.app.metrics

    def stop(self):
        """Stop observing and listening; fires when the port is closed."""
        self.app.metrics.stop()
        for observer in self.app.observers():
            try:
                self.factory.remove_observer(observer)
            except ValueError:
                pass  # stopped twice
        return defer.maybeDeferred(self.port.stopListening)


def problems(web, effective_user=None):
    """(setting, error text) about the web section as a whole ([] when it is off or sound).

    The password file must exist and be readable by effective_user (the
    manager reads it after dropping privileges, at every login).
    """
    if web.connection_spec is None:
        return []
    found = []
    if web.password_file is not None:
        reason = _unreadable(web.password_file, effective_user)
        if reason:
            found.append(("password_file", f"web.password_file {web.password_file}: {reason}"))
    if web.password_file is None and not web.metrics_without_login:
        found.append(("password_file", "web.connection_spec is set but web.password_file is "
                      "not: every page needs a login (create users with milter-manager-ctl "
                      "passwd), or set web.metrics_without_login = True to serve only "
                      "/metrics"))
    if (web.tls_certificate is None) != (web.tls_key is None):
        found.append(("tls_key" if web.tls_key is None else "tls_certificate",
                      "web.tls_certificate and web.tls_key go together: set both for "
                      "HTTPS, or neither"))
    return found


def _unreadable(path, user):
    """Why user (None: this process) cannot read path, or None."""
    import os
    import pwd
    import stat

    try:
        status = os.stat(path)
    except OSError as error:
        hint = (" (create it with milter-manager-ctl passwd --password-file PATH USER)"
                if isinstance(error, FileNotFoundError) else "")
        return f"{error.strerror}{hint}"
    if user is None:
        return None if os.access(path, os.R_OK) else "not readable by this process"
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return None  # an unknown effective_user is an error of its own
    if entry.pw_uid == 0:
        return None
    mode = status.st_mode
    if status.st_uid == entry.pw_uid:
        readable = mode & stat.S_IRUSR
    elif status.st_gid == entry.pw_gid or status.st_gid in os.getgrouplist(user, entry.pw_gid):
        readable = mode & stat.S_IRGRP
    else:
        readable = mode & stat.S_IROTH
    if readable:
        return None
    return (f"not readable by security.effective_user {user} (owner uid {status.st_uid}, mode "
            f"{stat.S_IMODE(mode):04o}): chown {user} {path}")
