"""Where CI has the installed Debian milters listen, and the edit of their files that does it.

scripts/install-test-deps runs this file (``python3 tests/peers/installed_milters.py``) after
installing opendkim, opendmarc, spamass-milter and clamav-milter: it edits each package's own
configuration file the way an admin would, on sockets that are none of the packages' defaults,
and makes sure each is enabled at boot. tests/test_detect_real.py imports the same table and
expects milter detection to find exactly these sockets. Idempotent; it starts nothing.
"""

import os
import re
import subprocess
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class InstalledMilter:
    """One Debian milter package as CI configures it.

    written is the socket as the admin writes it into file (under key); spec is the
    connection spec detection must report for it, written out here rather than derived.
    shipped is the package's own active value (None: no active line), the only one that is
    ever replaced.
    """

    name: str
    file: str
    key: str
    written: str
    spec: str
    shipped: str | None
    shell: bool = False  # file is a shell fragment (KEY="value"), not "Key value" lines

    @property
    def port(self):
        """The TCP port of an inet socket, else None."""
        match = re.fullmatch(r"inet:(\d+)@.*", self.spec)
        return match and int(match.group(1))

    @property
    def path(self):
        """The path of a UNIX socket, else None."""
        return self.spec[len("unix:"):] if self.spec.startswith("unix:") else None


# Loopback ports nothing on the test machines uses, and a socket directory of our own;
# four spellings an admin really writes: a name, an address, a bare path.
OPENDKIM = InstalledMilter("opendkim", "/etc/opendkim.conf", "Socket",
                           "inet:12891@localhost", "inet:12891@[127.0.0.1]",
                           "local:/run/opendkim/opendkim.sock")
OPENDMARC = InstalledMilter("opendmarc", "/etc/opendmarc.conf", "Socket",
                            "inet:12893@127.0.0.1", "inet:12893@[127.0.0.1]",
                            "local:/run/opendmarc/opendmarc.sock")
SPAMASS_MILTER = InstalledMilter("spamass-milter", "/etc/default/spamass-milter", "SOCKET",
                                 "/run/milter-manager-test/spamass.sock",
                                 "unix:/run/milter-manager-test/spamass.sock", None, shell=True)
CLAMAV_MILTER = InstalledMilter("clamav-milter", "/etc/clamav/clamav-milter.conf", "MilterSocket",
                                "inet:12894@127.0.0.1", "inet:12894@[127.0.0.1]",
                                "/var/run/clamav/clamav-milter.ctl")
MILTERS = (OPENDKIM, OPENDMARC, SPAMASS_MILTER, CLAMAV_MILTER)


def _active(key, shell):
    """A pattern for an active (uncommented) line setting key; group 1 is its value."""
    separator = r"=" if shell else r"[ \t]+"
    return re.compile(rf"^[ \t]*{re.escape(key)}{separator}(.*?)[ \t]*$")


def current_value(text, key, shell=False):
    """The value of the first active line setting key (shell quotes removed), or None."""
    for line in text.splitlines():
        match = _active(key, shell).match(line)
        if match:
            value = match.group(1)
            quoted = shell and len(value) > 1 and value[0] == value[-1] and value[0] in "\"'"
            return value[1:-1] if quoted else value
    return None


def set_option(text, key, value, shell=False):
    """Return text with key set to value: the first active line rewritten, later ones dropped.

    Comments stay as they are; a key with no active line is appended.
    """
    line = f'{key}="{value}"' if shell else f"{key} {value}"
    pattern = _active(key, shell)
    result, done = [], False
    for original in text.splitlines(keepends=True):
        if pattern.match(original.rstrip("\n")):
            if not done:
                result.append(line + "\n")
                done = True
            continue
        result.append(original)
    if not done:
        if result and not result[-1].endswith("\n"):
            result[-1] += "\n"
        result.append(line + "\n")
    return "".join(result)


def drop_example(text):
    """Return clamav-milter.conf's text without its `Example` line (which means: not configured)."""
    return "".join(line for line in text.splitlines(keepends=True)
                   if not re.match(r"^[ \t]*Example\b", line))


class Foreign(Exception):
    """The file holds a socket that is neither the package's nor ours: an admin's, left alone."""


def configure(milter, root="/"):
    """Write milter's socket into its file under root; return True if the file changed.

    Only the package's shipped socket is replaced, so that running the tests on a mail host
    never moves a socket its admin chose (Foreign is raised instead).
    """
    path = os.path.join(root, milter.file.lstrip("/"))
    with open(path) as source:
        before = source.read()
    value = current_value(before, milter.key, milter.shell)
    if value not in (milter.shipped, milter.written):
        raise Foreign(f"{milter.file}: {milter.key} is {value!r}, neither the package's "
                      f"{milter.shipped!r} nor the tests' {milter.written!r}: left as it is")
    after = set_option(before, milter.key, milter.written, milter.shell)
    if milter is CLAMAV_MILTER:
        after = drop_example(after)
    if after == before:
        return False
    with open(path + ".new", "w") as out:
        out.write(after)
    stat = os.stat(path)
    os.chown(path + ".new", stat.st_uid, stat.st_gid)
    os.chmod(path + ".new", stat.st_mode & 0o7777)
    os.replace(path + ".new", path)
    return True


def enable(name, root="/"):
    """Enable name at boot as its package's postinst would, where that did not happen.

    A package with a systemd unit gets its multi-user.target.wants link; one with only an
    init script gets its rc links (update-rc.d, as the postinst calls it).
    """
    unit = f"/lib/systemd/system/{name}.service"
    if os.path.exists(os.path.join(root, unit.lstrip("/"))):
        wants = os.path.join(root, "etc/systemd/system/multi-user.target.wants")
        link = os.path.join(wants, f"{name}.service")
        if not os.path.lexists(link):
            os.makedirs(wants, exist_ok=True)
            os.symlink(unit, link)
            return True
        return False
    rc2 = os.path.join(root, "etc/rc2.d")
    if any(re.fullmatch(rf"S\d\d{re.escape(name)}", entry) for entry in os.listdir(rc2)):
        return False
    subprocess.run(["update-rc.d", name, "defaults"], check=True, stdout=subprocess.DEVNULL)
    return True


def main():
    """Configure and enable each milter; one warning for a file that holds an admin's socket."""
    for milter in MILTERS:
        try:
            changed = configure(milter)
        except Foreign as error:
            print(f"installed_milters: warning: {error}", file=sys.stderr)
            continue
        if changed:
            print(f"installed_milters: {milter.file}: {milter.key} {milter.written}",
                  file=sys.stderr)
        if enable(milter.name):
            print(f"installed_milters: enabled {milter.name} at boot", file=sys.stderr)


if __name__ == "__main__":
    main()
