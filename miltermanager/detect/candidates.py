"""The milters each platform looks for, in upstream's order, with their default conditions.

Upstream's candidates and applicable conditions (data/defaults/*.conf),
plus OpenDMARC everywhere: right after the DKIM milter, because it reads
the Authentication-Results header that the DKIM milter before it adds,
with Remote Network and Unauthenticated, because DMARC judges mail from
outside and the domain owner's own authenticated users are not that.
"""

from dataclasses import dataclass

GREYLIST = ("Sendmail Compatible", "Stress Notify", "Trust", "Remote Network", "S25R",
            "Unauthenticated")
FILTER = ("Remote Network", "Unauthenticated", "No Stress")
DMARC = ("Remote Network", "Unauthenticated")


@dataclass(frozen=True)
class Candidate:
    """A milter to look for.

    name is its service (systemd unit, init or rc.d script); kind says
    whose own file holds the socket ("opendkim", "opendmarc", "clamav",
    "greylist", "enma", "rspamd", or None for none); files are that file's
    usual places, tried in order; file_options the command-line options that
    name another file; socket_options those that give the socket on the
    command line (which wins over the file, as the milters read it).
    """

    name: str
    conditions: tuple = ()
    kind: str | None = None
    files: tuple = ()
    file_options: tuple = ()
    socket_options: tuple = ("-p",)


def _linux(etc_mail="/etc/mail"):
    return {
        "greylist": dict(kind="greylist", files=("/etc/milter-greylist/greylist.conf",
                                                 f"{etc_mail}/greylist.conf"),
                         file_options=("-f",)),
        "clamav": dict(kind="clamav", files=("/etc/clamav/clamav-milter.conf",
                                             f"{etc_mail}/clamav-milter.conf"),
                       file_options=("-c", "--config-file"), socket_options=()),
        "opendkim": dict(kind="opendkim", files=("/etc/opendkim.conf",), file_options=("-x",)),
        "opendmarc": dict(kind="opendmarc", files=("/etc/opendmarc.conf",),
                          file_options=("-c",)),
        "rspamd": dict(kind="rspamd", files=("/etc/rspamd",), socket_options=()),
    }


_L = _linux()

DEBIAN = (
    Candidate("milter-greylist", GREYLIST, **_L["greylist"]),
    Candidate("spfmilter", FILTER),
    Candidate("clamav-milter", (), **_L["clamav"]),
    Candidate("dkim-filter", (), kind="opendkim", files=("/etc/dkim-filter.conf",),
              file_options=("-x",)),
    Candidate("opendkim", (), **_L["opendkim"]),
    Candidate("opendmarc", DMARC, **_L["opendmarc"]),
    Candidate("spamass-milter", FILTER),
    Candidate("amavisd-new-milter", ()),
    Candidate("rspamd", FILTER, **_L["rspamd"]),
)

REDHAT = (
    Candidate("milter-greylist", GREYLIST, **_L["greylist"]),
    Candidate("clamav-milter", (), **{**_L["clamav"], "files": (
        "/etc/mail/clamav-milter.conf", "/etc/clamav-milter.conf")}),
    Candidate("enma", FILTER, kind="enma", files=("/etc/enma.conf",), file_options=("-c",)),
    Candidate("spamass-milter", FILTER),
    Candidate("amavisd", ()),
    Candidate("opendkim", (), **_L["opendkim"]),
    Candidate("opendmarc", DMARC, **_L["opendmarc"]),
    Candidate("rspamd", FILTER, **_L["rspamd"]),
)

_LOCAL = "/usr/local/etc"
FREEBSD = (
    Candidate("milter-greylist", GREYLIST, kind="greylist",
              files=(f"{_LOCAL}/mail/greylist.conf",), file_options=("-f",)),
    Candidate("milter-enma", FILTER, kind="enma", files=(f"{_LOCAL}/enma.conf",),
              file_options=("-c",)),
    Candidate("milter-sid", FILTER),
    Candidate("clamav-milter", (), kind="clamav", files=(f"{_LOCAL}/clamav-milter.conf",),
              file_options=("-c", "--config-file"), socket_options=()),
    Candidate("milter-dkim", ()),
    Candidate("milter-opendkim", (), kind="opendkim",
              files=(f"{_LOCAL}/mail/opendkim.conf", f"{_LOCAL}/opendkim.conf"),
              file_options=("-x",)),
    Candidate("opendmarc", DMARC, kind="opendmarc",
              files=(f"{_LOCAL}/mail/opendmarc.conf", f"{_LOCAL}/opendmarc.conf"),
              file_options=("-c",)),
    Candidate("spamass-milter", FILTER),
    Candidate("amavis-milter", ()),
    Candidate("rspamd", FILTER, kind="rspamd", files=(f"{_LOCAL}/rspamd",), socket_options=()),
)


def pkgsrc(prefix):
    """pkgsrc's candidates; its files live under prefix (package.options prefix=)."""
    return (
        Candidate("milter-greylist", GREYLIST, kind="greylist",
                  files=(f"{prefix}/mail/greylist.conf", f"{prefix}/greylist.conf"),
                  file_options=("-f",)),
        Candidate("milter-regex", FILTER),
        Candidate("mimedefang", ()),
        Candidate("enma", FILTER, kind="enma", files=(f"{prefix}/enma.conf",),
                  file_options=("-c",)),
        Candidate("dk-milter", ()),
        Candidate("dkim-filter", (), kind="opendkim", files=(f"{prefix}/dkim-filter.conf",),
                  file_options=("-x",)),
        Candidate("opendmarc", DMARC, kind="opendmarc", files=(f"{prefix}/opendmarc.conf",),
                  file_options=("-c",)),
        Candidate("spamass-milter", FILTER),
        Candidate("amavismilter", ()),
    )


PLATFORMS = ("debian", "redhat", "freebsd", "pkgsrc")
