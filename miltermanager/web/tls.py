"""HTTPS for the web endpoint (web.tls_certificate, web.tls_key)."""


def wrap(settings, factory):
    """factory as it listens: wrapped in TLS when the settings name a certificate."""
    if settings.tls_certificate is None:
        return factory
    raise ValueError("web.tls_certificate: HTTPS is not available yet")
