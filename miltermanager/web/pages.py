"""The pages that show: dashboard, recent sessions, a session's trace, the configuration."""


def install(app, root):
    pass
