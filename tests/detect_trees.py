"""Fake system trees for milter detection: every platform with every milter, and broken ones.

Shared by tests/test_detect.py, which writes out what detection must find in
them, and scripts/detection-matrix, which prints the table of
docs/detection.md from them, so that the table is what the code finds.
Debian's spamass-milter files are the package's own (tests/fixtures/detect).
"""

import os
import textwrap

from miltermanager import detect

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "detect")
PLATFORMS = ("debian", "redhat", "freebsd", "pkgsrc")
MILTERS = ("opendkim", "opendmarc", "clamav-milter", "spamass-milter", "milter-greylist",
           "rspamd")
# The candidate each milter is on each platform (upstream's names), None: not a candidate.
NAMES = {
    "debian": {milter: milter for milter in MILTERS},
    "redhat": {milter: milter for milter in MILTERS},
    "freebsd": {**{milter: milter for milter in MILTERS}, "opendkim": "milter-opendkim"},
    "pkgsrc": {**{milter: milter for milter in MILTERS}, "opendkim": "dkim-filter",
               "clamav-milter": None, "rspamd": None},
}


def fixture(name):
    with open(os.path.join(FIXTURES, name), encoding="utf-8") as file:
        return file.read()


def write(root, path, text, mode=0o644):
    real = os.path.join(root, path.lstrip("/"))
    os.makedirs(os.path.dirname(real), exist_ok=True)
    with open(real, "w", encoding="utf-8") as file:
        file.write(textwrap.dedent(text))
    os.chmod(real, mode)


def link(root, path, target):
    real = os.path.join(root, path.lstrip("/"))
    os.makedirs(os.path.dirname(real), exist_ok=True)
    os.symlink(target, real)


def enable_unit(root, name, directory="/lib/systemd/system"):
    link(root, f"/etc/systemd/system/multi-user.target.wants/{name}.service",
         f"{directory}/{name}.service")


def enable_init(root, name):
    for level in "2345":
        link(root, f"/etc/rc{level}.d/S01{name}", f"../init.d/{name}")


def unit(description, command, environment_file=None):
    lines = ["[Unit]", f"Description={description}", "", "[Service]", "Type=forking"]
    if environment_file:
        lines.append(f"EnvironmentFile={environment_file}")
    lines += [f"ExecStart={command}", "", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)


RSPAMD_PROXY = """\
    # Debian's and Fedora's shipped worker-proxy.inc
    milter = yes; # Enable milter mode
    timeout = 120s; # Needed for Milter usually
    upstream "local" {
      default = yes; # Self-scan upstreams are always default
      self_scan = yes; # Enable self-scan
    }
    count = 1; # Do not spawn too many processes of this type
    max_retries = 5; # How many times master is queried in case of failure
    discard_on_reject = false;
    quarantine_on_reject = false;
    spam_header = "X-Spam";
    reject_message = "Spam message rejected";
    bind_socket = "localhost:11332";
    """

CLAMAV_INIT = """\
    #!/bin/sh
    ### BEGIN INIT INFO
    # Provides:          clamav-milter
    # Description:       Clam AntiVirus milter interface
    ### END INIT INFO
    DAEMON=/usr/sbin/clamav-milter
    NAME=clamav-milter
    CLAMAVCONF=/etc/clamav/clamav-milter.conf
    slurp_config()
    {
      CLAMAVCONF="$1"
    }
    if [ ! -f "$CLAMAVCONF" ]; then
      exit 0
    fi
    slurp_config "$CLAMAVCONF"
    """


def debian(root, postfix=True):
    """Debian 12 with each milter's package installed, configured as shipped, and enabled."""
    write(root, "/lib/systemd/system/opendkim.service",
          unit("OpenDKIM Milter", "/usr/sbin/opendkim"))
    write(root, "/etc/opendkim.conf", """\
        Syslog			yes
        UMask			007
        Socket			local:/run/opendkim/opendkim.sock
        PidFile			/run/opendkim/opendkim.pid
        """)
    enable_unit(root, "opendkim")
    write(root, "/lib/systemd/system/opendmarc.service",
          unit("OpenDMARC Milter", "/usr/sbin/opendmarc"))
    write(root, "/etc/opendmarc.conf", "PidFile /run/opendmarc/opendmarc.pid\n"
                                       "Socket local:/run/opendmarc/opendmarc.sock\n")
    enable_unit(root, "opendmarc")
    write(root, "/etc/init.d/clamav-milter", CLAMAV_INIT, 0o755)
    write(root, "/etc/clamav/clamav-milter.conf", """\
        MilterSocket /var/run/clamav/clamav-milter.ctl
        FixStaleSocket true
        User clamav
        ClamdSocket unix:/var/run/clamav/clamd.ctl
        """)
    enable_init(root, "clamav-milter")
    write(root, "/etc/init.d/spamass-milter", fixture("debian-spamass-milter.init"), 0o755)
    write(root, "/etc/default/spamass-milter", fixture("debian-spamass-milter.default"))
    enable_init(root, "spamass-milter")
    write(root, "/etc/init.d/milter-greylist", """\
        #!/bin/sh
        # Short-Description: milter-greylist
        NAME=milter-greylist
        DAEMON=/usr/sbin/milter-greylist
        """, 0o755)
    write(root, "/etc/default/milter-greylist", "ENABLED=1\n")
    write(root, "/etc/milter-greylist/greylist.conf", """\
        pidfile "/var/run/milter-greylist.pid"
        socket "/var/run/milter-greylist/milter-greylist.sock"
        dumpfile "/var/lib/milter-greylist/greylist.db"
        racl whitelist list "my network"
        racl greylist default
        """)
    enable_init(root, "milter-greylist")
    write(root, "/lib/systemd/system/rspamd.service", unit(
        "rapid spam filtering system", "/usr/bin/rspamd -c /etc/rspamd/rspamd.conf -f"))
    write(root, "/etc/rspamd/worker-proxy.inc", RSPAMD_PROXY)
    enable_unit(root, "rspamd")
    if postfix:
        write(root, "/usr/sbin/postfix", "#!/bin/sh\n", 0o755)


def redhat(root):
    """Fedora / RHEL with EPEL: units in /usr/lib/systemd/system, /etc/sysconfig."""
    units = "/usr/lib/systemd/system"
    write(root, f"{units}/opendkim.service", unit(
        "DomainKeys Identified Mail (DKIM) Milter", "/usr/sbin/opendkim $OPTIONS",
        "-/etc/sysconfig/opendkim"))
    write(root, "/etc/sysconfig/opendkim",
          'OPTIONS="-x /etc/opendkim.conf -P /run/opendkim/opendkim.pid"\n')
    write(root, "/etc/opendkim.conf", "Mode v\nSocket inet:8891@localhost\n")
    write(root, f"{units}/opendmarc.service", unit(
        "Domain-based Message Authentication, Reporting & Conformance (DMARC) Milter",
        "/usr/sbin/opendmarc $OPTIONS", "-/etc/sysconfig/opendmarc"))
    write(root, "/etc/sysconfig/opendmarc",
          'OPTIONS="-c /etc/opendmarc.conf -P /run/opendmarc/opendmarc.pid"\n')
    write(root, "/etc/opendmarc.conf", "Socket inet:8893@localhost\n")
    write(root, f"{units}/clamav-milter.service", unit(
        "Milter module for the Clam Antivirus scanner",
        "/usr/sbin/clamav-milter -c /etc/mail/clamav-milter.conf"))
    write(root, "/etc/mail/clamav-milter.conf",
          "MilterSocket /run/clamav-milter/clamav-milter.socket\nUser clamilt\n")
    write(root, f"{units}/spamass-milter.service", unit(
        "Mail filter for SpamAssassin",
        "/usr/sbin/spamass-milter -p $SOCKET -g $SOCKET_GROUP $EXTRA_FLAGS",
        "-/etc/sysconfig/spamass-milter"))
    write(root, "/etc/sysconfig/spamass-milter",
          "SOCKET=/run/spamass-milter/spamass-milter.sock\nSOCKET_GROUP=postfix\n")
    write(root, f"{units}/milter-greylist.service", unit(
        "Milter-greylist", "/usr/sbin/milter-greylist -f /etc/mail/greylist.conf "
                           "-P /run/milter-greylist/milter-greylist.pid"))
    write(root, "/etc/mail/greylist.conf", 'socket "/run/milter-greylist/milter-greylist.sock"\n'
                                           "racl greylist default tarpit 2m\n")
    write(root, f"{units}/rspamd.service", unit(
        "rapid spam filtering system", "/usr/bin/rspamd -c /etc/rspamd/rspamd.conf -f"))
    write(root, "/etc/rspamd/worker-proxy.inc", RSPAMD_PROXY)
    write(root, "/etc/rspamd/local.d/worker-proxy.inc",
          'bind_socket = "/run/rspamd/milter.sock mode=0660";\n')
    for name in ("opendkim", "opendmarc", "clamav-milter", "spamass-milter", "milter-greylist",
                 "rspamd"):
        enable_unit(root, name, units)


def _rc(root, directory, script, name, rcvar, lines):
    write(root, f"{directory}/{script}", "\n".join([
        "#!/bin/sh", f"# PROVIDE: {script}", ". /etc/rc.subr", "",
        f'name="{name}"', f"rcvar={rcvar}", "", "load_rc_config $name", "", *lines,
        'run_rc_command "$1"', ""]), 0o755)


def freebsd(root):
    """FreeBSD ports: rc.d scripts in /usr/local/etc/rc.d, enabled in /etc/rc.conf."""
    rc_d = "/usr/local/etc/rc.d"
    _rc(root, rc_d, "milter-opendkim", "milteropendkim", "milteropendkim_enable", [
        ': ${milteropendkim_enable:="NO"}',
        ': ${milteropendkim_cfgfile:="/usr/local/etc/mail/opendkim.conf"}',
        ': ${milteropendkim_socket:="inet:8891@localhost"}',
        'command_args="-l -p ${milteropendkim_socket} -x ${milteropendkim_cfgfile}"'])
    write(root, "/usr/local/etc/mail/opendkim.conf", "Domain example.org\n")
    _rc(root, rc_d, "opendmarc", "opendmarc", "opendmarc_enable", [
        ': ${opendmarc_enable:="NO"}',
        ': ${opendmarc_socketspec:="inet:8893@localhost"}',
        'command_args="-c /usr/local/etc/mail/opendmarc.conf -p ${opendmarc_socketspec}"'])
    write(root, "/usr/local/etc/mail/opendmarc.conf", "AuthservID mx.example.org\n")
    _rc(root, rc_d, "clamav-milter", "clamav_milter", "clamav_milter_enable", [
        ': ${clamav_milter_enable:="NO"}',
        'command_args="--config-file=/usr/local/etc/clamav-milter.conf"'])
    write(root, "/usr/local/etc/clamav-milter.conf",
          "MilterSocket unix:/var/run/clamav/clmilter.sock\n")
    _rc(root, rc_d, "spamass-milter", "spamass_milter", "spamass_milter_enable", [
        ': ${spamass_milter_enable:="NO"}',
        ': ${spamass_milter_socket="/var/run/spamass-milter.sock"}',
        'command_args="-f -p ${spamass_milter_socket} ${spamass_milter_flags}"'])
    _rc(root, rc_d, "milter-greylist", "miltergreylist", "miltergreylist_enable", [
        ': ${miltergreylist_enable:="NO"}',
        ': ${miltergreylist_cfgfile="/usr/local/etc/mail/greylist.conf"}',
        'command_args="-P /var/run/milter-greylist.pid -f ${miltergreylist_cfgfile}"'])
    write(root, "/usr/local/etc/mail/greylist.conf",
          'socket "/var/milter-greylist/milter-greylist.sock"\n')
    _rc(root, rc_d, "rspamd", "rspamd", "rspamd_enable", [': ${rspamd_enable:="NO"}'])
    write(root, "/usr/local/etc/rspamd/worker-proxy.inc", RSPAMD_PROXY)
    write(root, "/etc/rc.conf", 'hostname="mx.example.org"\n' + "".join(
        f'{name}_enable="YES"\n' for name in (
            "milteropendkim", "opendmarc", "clamav_milter", "spamass_milter",
            "miltergreylist", "rspamd")))


def pkgsrc(root):
    """pkgsrc on NetBSD: rc.d scripts and files under /usr/pkg/etc, rcvar set in rc.conf."""
    etc = "/usr/pkg/etc"
    _rc(root, f"{etc}/rc.d", "dkim-filter", "dkim_filter", "$name", [
        ': ${dkim_filter_socket:="local:/var/run/dkim-filter/dkim-filter.sock"}',
        'command_args="-p ${dkim_filter_socket}"'])
    _rc(root, f"{etc}/rc.d", "opendmarc", "opendmarc", "$name", [
        f'command_args="-c {etc}/opendmarc.conf"'])
    write(root, f"{etc}/opendmarc.conf", "Socket inet:8893@localhost\n")
    _rc(root, f"{etc}/rc.d", "spamass-milter", "spamass_milter", "$name", [
        ": ${spamass_milter_socket:=/var/run/spamass.sock}"])
    _rc(root, f"{etc}/rc.d", "milter-greylist", "milter_greylist", "$name", [
        f'command_args="-f {etc}/mail/greylist.conf"'])
    write(root, f"{etc}/mail/greylist.conf", 'socket "/var/run/milter-greylist.sock"\n')
    write(root, "/etc/rc.conf", "dkim_filter=YES\nopendmarc=YES\nspamass_milter=YES\n"
                                "milter_greylist=YES\n")


TREES = {"debian": debian, "redhat": redhat, "freebsd": freebsd, "pkgsrc": pkgsrc}


def _spamass_without_postfix(root):
    debian(root, postfix=False)


def _opendkim_twice(root):
    write(root, "/lib/systemd/system/opendkim.service", unit("OpenDKIM", "/usr/sbin/opendkim"))
    write(root, "/etc/opendkim.conf", "Socket inet:8891@localhost\nSocket local:/run/o.sock\n")


def _opendkim_missing_x(root):
    write(root, "/lib/systemd/system/opendkim.service",
          unit("OpenDKIM", "/usr/sbin/opendkim -x /etc/opendkim/opendkim.conf"))


def _opendkim_unset_variable(root):
    write(root, "/etc/init.d/opendkim", "#!/bin/sh\nNAME=opendkim\n", 0o755)
    write(root, "/etc/default/opendkim", "SOCKET=local:$RUNDIR/opendkim.sock\n")


def _opendmarc_no_conf(root):
    write(root, "/lib/systemd/system/opendmarc.service", unit("OpenDMARC", "/usr/sbin/opendmarc"))


def _clamav_example(root):
    write(root, "/etc/init.d/clamav-milter", CLAMAV_INIT, 0o755)
    write(root, "/etc/clamav/clamav-milter.conf", "Example\n#MilterSocket inet:7357\n")


def _rspamd_not_milter(root):
    write(root, "/lib/systemd/system/rspamd.service", unit("rspamd", "/usr/bin/rspamd -f"))
    write(root, "/etc/rspamd/worker-proxy.inc", RSPAMD_PROXY)
    write(root, "/etc/rspamd/override.d/worker-proxy.inc", "milter = no;\n")


def _spamass_environment_missing(root):
    write(root, "/usr/lib/systemd/system/spamass-milter.service", unit(
        "spamass-milter", "/usr/sbin/spamass-milter -p $SOCKET", "/etc/sysconfig/spamass-milter"))


def _opendkim_masked(root):
    redhat(root)
    link(root, "/etc/systemd/system/opendkim.service", "/dev/null")


def _spamass_no_name(root):
    write(root, "/usr/local/etc/rc.d/spamass-milter", "#!/bin/sh\necho starting\n", 0o755)


def _greylist_bad_socket(root):
    _rc(root, "/usr/pkg/etc/rc.d", "milter-greylist", "milter_greylist", "$name",
        ['command_args="-f /usr/pkg/etc/mail/greylist.conf"'])
    write(root, "/usr/pkg/etc/mail/greylist.conf", 'socket "var/run/greylist.sock"\n')


# (platform, milter, case, tree builder): variants and broken files, one tree each.
CASES = (
    ("debian", "spamass-milter", "Debian's own files, Postfix not installed",
     _spamass_without_postfix),
    ("debian", "opendkim", "Socket written twice with different values", _opendkim_twice),
    ("debian", "opendkim", "the unit's -x names a file that is not there", _opendkim_missing_x),
    ("debian", "opendkim", "init script, SOCKET uses $RUNDIR, which nothing sets",
     _opendkim_unset_variable),
    ("debian", "opendmarc", "unit, but no opendmarc.conf", _opendmarc_no_conf),
    ("debian", "clamav-milter", "clamav-milter.conf still the example", _clamav_example),
    ("debian", "rspamd", "proxy worker not in milter mode", _rspamd_not_milter),
    ("redhat", "spamass-milter", "the unit's EnvironmentFile= (no '-') is missing",
     _spamass_environment_missing),
    ("redhat", "opendkim", "unit masked (linked to /dev/null)", _opendkim_masked),
    ("freebsd", "spamass-milter", "rc.d script without name=", _spamass_no_name),
    ("pkgsrc", "milter-greylist", "greylist.conf socket is a relative path",
     _greylist_bad_socket),
)


def cell(report, name):
    """What detection says of candidate name in report, in one line."""
    if name is None:
        return "not a candidate"
    for found in report.found:
        if found.name == name:
            state = "" if found.enabled else " (disabled)"
            return f"`{found.connection_spec}`{state} from `{found.source}`"
    for skipped in report.skipped:
        if skipped.name == name:
            return f"skipped: `{skipped.path}`: {skipped.reason}"
    return "not found"


def _detect(directory, platform, build):
    root = os.path.join(directory, f"{platform}-{len(os.listdir(directory))}")
    os.makedirs(root)
    build(root)
    return detect.detect(platform, root, postconf=False)


def matrix(directory):
    """{(platform, milter): cell} for the platform trees, built under directory."""
    cells = {}
    for platform in PLATFORMS:
        report = _detect(directory, platform, TREES[platform])
        for milter in MILTERS:
            name = NAMES[platform][milter]
            text = cell(report, name)
            cells[platform, milter] = text if name in (milter, None) else f"{name}: {text}"
    return cells


def cases(directory):
    """[(platform, milter, case, cell)] for CASES, each in its own tree under directory."""
    rows = []
    for platform, milter, case, build in CASES:
        report = _detect(directory, platform, build)
        rows.append((platform, milter, case, cell(report, NAMES[platform][milter])))
    return rows


def markdown(directory):
    """The two tables of docs/detection.md's detection matrix."""
    cells = matrix(directory)
    lines = ["| Milter | " + " | ".join(PLATFORMS) + " |",
             "|---|" + "---|" * len(PLATFORMS)]
    for milter in MILTERS:
        lines.append(f"| {milter} | " + " | ".join(
            cells[platform, milter].replace("|", "\\|") for platform in PLATFORMS) + " |")
    lines += ["", "| Platform | Milter | Case | Result |", "|---|---|---|---|"]
    for platform, milter, case, text in cases(directory):
        lines.append(f"| {platform} | {milter} | {case} | {text.replace('|', chr(92) + '|')} |")
    return "\n".join(lines) + "\n"
