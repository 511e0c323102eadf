"""The pages that change the configuration (admin role): forms, diff, confirm, undo."""


def install(app, root):
    pass
