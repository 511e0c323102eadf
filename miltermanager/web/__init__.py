"""The web interface on web.connection_spec: status pages, the configuration editor, /metrics.

app.py puts the pieces together and listens; guard.py and auth.py keep
every page behind a login (users, sessions, CSRF, rate limits, TLS);
activity.py and pages.py are the dashboard, the recent sessions and the
configuration as it runs; editing.py and edit_pages.py change the custom
configuration file. Off by default: nothing here is imported unless
web.connection_spec is set.
"""
