"""The pages' HTML: one layout, escaping, nothing that needs a build step.

Every value that comes from the mail, the configuration or the request is
escaped with esc(). page() gives the whole document as bytes, with the
navigation, the user's name and a logout form carrying the CSRF token.
"""

from html import escape

NAVIGATION = (("/", "Dashboard"), ("/sessions", "Sessions"),
              ("/configuration", "Configuration"), ("/edit", "Edit"))


def esc(value):
    """value as HTML text (quotes too: safe in attributes)."""
    return escape("" if value is None else str(value), quote=True)


def csrf_field(request):
    """The hidden field every state-changing form carries."""
    return f'<input type="hidden" name="csrf" value="{esc(request.web_csrf)}">'


def page(request, title, body, scripts=(), active=None):
    """The whole HTML document of a page, as UTF-8 bytes.

    body is HTML (already escaped where it needs to be); scripts are paths
    under /static/ loaded at the end; active is the navigation path shown
    as the current one.
    """
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    user = getattr(request, "web_user", None)
    links = "".join(
        f'<a href="{path}"{" class=active" if path == active else ""}>{esc(label)}</a>'
        for path, label in NAVIGATION)
    account = ""
    if user is not None:
        account = (f'<form class="logout" method="post" action="/logout">{csrf_field(request)}'
                   f'<span class="user">{esc(user.name)} ({esc(user.role)})</span> '
                   f'<button type="submit">Log out</button></form>')
    tags = "".join(f'<script src="/static/{esc(name)}"></script>' for name in scripts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{esc(title)} - milter-manager</title>'
            f'<link rel="stylesheet" href="/static/style.css"></head>'
            f'<body><header><strong>milter-manager</strong><nav>{links}</nav>{account}</header>'
            f'<main><h1>{esc(title)}</h1>{body}</main>{tags}</body></html>').encode("utf-8")
