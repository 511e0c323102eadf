"""HTTPS for the web endpoint (web.tls_certificate, web.tls_key).

The files are read once, when the endpoint starts (before privileges are
dropped, so they may be readable by root only). TLS 1.2 or newer, no
compression (Twisted's CertificateOptions never offers it). Needs
pyOpenSSL (Twisted's "tls" extra; Debian: python3-openssl and
python3-service-identity).
"""


def wrap(settings, factory):
    """factory as it listens: wrapped in TLS when the settings name a certificate.

    ValueError, worded for the operator, when the files cannot be read,
    are not PEM, do not match, or pyOpenSSL is missing.
    """
    if settings.tls_certificate is None and settings.tls_key is None:
        return factory
    from twisted.protocols.tls import TLSMemoryBIOFactory

    return TLSMemoryBIOFactory(context_factory(settings.tls_certificate, settings.tls_key),
                               False, factory)


def context_factory(certificate_path, key_path):
    """CertificateOptions serving the PEM certificate (chain) and key at those paths."""
    if certificate_path is None or key_path is None:
        raise ValueError("web.tls_certificate and web.tls_key go together: set both for "
                         "HTTPS, or neither")
    try:
        from cryptography import x509
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives import serialization
        from OpenSSL import SSL, crypto
        from twisted.internet import ssl
    except ImportError as error:
        raise ValueError(f"web.tls_certificate {certificate_path}: HTTPS needs pyOpenSSL "
                         f"(pip: twisted[tls]; Debian: python3-openssl and "
                         f"python3-service-identity): {error}") from None
    certificate_text = _read("web.tls_certificate", certificate_path)
    key_text = _read("web.tls_key", key_path)
    chain = []
    marker = b"-----BEGIN CERTIFICATE-----"
    for block in certificate_text.split(marker)[1:]:
        try:
            chain.append(x509.load_pem_x509_certificate(marker + block))
        except ValueError:
            raise ValueError(f"web.tls_certificate {certificate_path}: a certificate in it is "
                             "not valid PEM") from None
    if not chain:
        raise ValueError(f"web.tls_certificate {certificate_path}: no PEM certificate in it "
                         f"(-----BEGIN CERTIFICATE-----)")
    try:
        key = serialization.load_pem_private_key(key_text, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(f"web.tls_key {key_path}: not a PEM private key (or one protected "
                         "by a passphrase, which the manager cannot ask for)") from None

    def public(each):
        return each.public_bytes(serialization.Encoding.DER,
                                 serialization.PublicFormat.SubjectPublicKeyInfo)

    if public(chain[0].public_key()) != public(key.public_key()):
        raise ValueError(f"web.tls_key {key_path}: does not match the certificate "
                         f"{certificate_path}")
    try:
        # pyOpenSSL from 24.3 takes cryptography's objects (and deprecates its own).
        SSL.Context(SSL.TLS_METHOD).use_certificate(chain[0])
    except TypeError:
        chain = [crypto.X509.from_cryptography(each) for each in chain]
        key = crypto.PKey.from_cryptography_key(key)
    options = ssl.CertificateOptions(privateKey=key, certificate=chain[0],
                                     extraCertChain=chain[1:],
                                     raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
    try:
        options.getContext()
    except SSL.Error as error:
        raise ValueError(f"web.tls_certificate {certificate_path}: cannot be used with "
                         f"web.tls_key {key_path}: {error}") from None
    return options


def _read(setting, path):
    try:
        with open(path, "rb") as stream:
            return stream.read()
    except OSError as error:
        raise ValueError(f"{setting} {path}: cannot read: {error.strerror or error}") from None
