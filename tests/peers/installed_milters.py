"""Where CI configures the installed Debian milters to listen, and the edit of their files that does it.

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
    """

    name: str
    file: str
    key: str
    written: str
    spec: str
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
                           "inet:12891@localhost", "inet:12891@[127.0.0.1]")
OPENDMARC = InstalledMilter("opendmarc", "/etc/opendmarc.conf", "Socket",
                            "inet:12893@127.0.0.1", "inet:12893@[127.0.0.1]")
SPAMASS_MILTER = InstalledMilter("spamass-milter", "/etc/default/spamass-milter", "SOCKET",
                                 "/run/milter-manager-test/spamass.sock",
                                 "unix:/run/milter-manager-test/spamass.sock", shell=True)
CLAMAV_MILTER = InstalledMilter("clamav-milter", "/etc/clamav/clamav-milter.conf", "MilterSocket",
                                "inet:12894@127.0.0.1", "inet:12894@[127.0.0.1]")
MILTERS = (OPENDKIM, OPENDMARC, SPAMASS_MILTER, CLAMAV_MILTER)


def set_option(text, key, value, shell=False):
    """Return text with key set to value: the first active line rewritten, later ones dropped.

    Comments stay as they are; a key with no active line is appended.
    """
    line = f'{key}="{value}"' if shell else f"{key} {value}"
    pattern = re.compile(rf"^[ \t]*{re.escape(key)}" + (r"=" if shell else r"[ \t]") + r".*$",
                         re.MULTILINE)
    lines = text.splitlines(keepends=True)
    result, done = [], False
    for original in lines:
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


def configure(milter, root="/"):
    """Write milter's socket into its file under root; return True if the file changed."""
    path = os.path.join(root, milter.file.lstrip("/"))
    with open(path) as source:
        before = source.read()
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
    for milter in MILTERS:
        if configure(milter):
            print(f"installed_milters: {milter.file}: {milter.key} {milter.written}", file=sys.stderr)
        if enable(milter.name):
            print(f"installed_milters: enabled {milter.name} at boot", file=sys.stderr)


if __name__ == "__main__":
    main()
