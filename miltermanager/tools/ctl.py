"""milter-manager-ctl: ask a running milter-manager through its controller socket.

Commands: status, children, reload, show-config, trace QUEUE-ID|SESSION.
Human tables by default, the manager's JSON with --json. The socket is
-s/--connection-spec, else controller.connection_spec of the configuration
file (-c), else DEFAULT_CONNECTION_SPEC.

passwd USER sets a web user's password in the password file (--password-file,
else web.password_file of the configuration file) without the manager.
"""

import argparse
import json
import os
import socket
import struct
import sys

from miltermanager import connection_spec
from miltermanager.controller import protocol as wire

PROGRAM_NAME = "milter-manager-ctl"
DEFAULT_CONFIG = "/etc/milter-manager/milter-manager.conf"
DEFAULT_CONNECTION_SPEC = "unix:/run/milter-manager/milter-manager-controller.sock"
COMMANDS = ("status", "children", "reload", "show-config", "trace", "passwd")


class CtlError(Exception):
    """What went wrong, for one line on stderr; status is the exit status."""

    def __init__(self, text, status=2):
        super().__init__(text)
        self.status = status


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROGRAM_NAME,
        description="Show the status of a running milter-manager, its children and the "
                    "decisions of recent sessions; reload it; print its configuration.")
    add = parser.add_argument
    add("-s", "--connection-spec", metavar="SPEC",
        help="the controller socket: unix:PATH, inet:PORT@HOST (default: "
             "controller.connection_spec of the configuration file, else "
             f"{DEFAULT_CONNECTION_SPEC})")
    add("-c", "--config", metavar="FILE", default=None,
        help=f"the configuration file that names the socket and web.password_file "
             f"(default: {DEFAULT_CONFIG} "
             "if it exists)")
    add("--json", action="store_true", help="print the manager's answer as JSON")
    add("--timeout", type=float, default=30.0, metavar="SECONDS",
        help="seconds to wait for the answer (%(default)s)")
    add("command", choices=COMMANDS, help="what to do")
    add("query", nargs="?", metavar="QUEUE-ID|SESSION|USER",
        help="for trace: the MTA's queue id of a message, or the manager's session number; "
             "for passwd: the web user")
    passwd = parser.add_argument_group(
        "passwd options", "passwd USER sets the password of a web user (read from standard "
        "input when it is not a terminal, else asked twice); no running manager is needed")
    passwd.add_argument("--role", metavar="admin|read-only",
                        help="the user's role: admin may change the configuration, read-only "
                             "may only look (default: the user's role so far; admin for a "
                             "new user)")
    passwd.add_argument("--delete", action="store_true", help="remove the user instead")
    passwd.add_argument("--password-file", metavar="FILE",
                        help="the password file (default: web.password_file of the "
                             "configuration file)")
    return parser


def spec_of(options):
    """The controller's connection spec for options."""
    if options.connection_spec:
        return options.connection_spec
    path = options.config or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)
    if path is None:
        return DEFAULT_CONNECTION_SPEC
    from miltermanager import config

    try:
        configuration = config.load(path, load_paths=config.load_paths())
    except (config.ConfigurationError, OSError) as error:
        raise CtlError(f"cannot read {path} for controller.connection_spec: {error}; "
                       "give -s") from None
    spec = configuration.controller.connection_spec
    if spec is None:
        raise CtlError(f"{path} has no controller (controller.connection_spec is not set); "
                       "set it, or give -s")
    return spec


def ask(spec_text, name, content=b"", timeout=30.0):
    """Send one command to the controller at spec_text; return (reply name, reply text)."""
    try:
        spec = connection_spec.parse(spec_text)
    except ValueError as error:
        raise CtlError(str(error)) from None
    if spec.is_unix:
        family, address = socket.AF_UNIX, spec.path
    elif spec.family in ("inet", "inet6"):
        family = socket.AF_INET6 if spec.family == "inet6" else socket.AF_INET
        address = (spec.host or ("::1" if spec.family == "inet6" else "127.0.0.1"), spec.port)
    else:
        raise CtlError(f"{spec_text}: give the controller as unix:PATH or inet:PORT@HOST")
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(address)
        except OSError as error:
            raise CtlError(f"cannot connect to the controller at {spec_text}: "
                           f"{error.strerror or error}") from None
        sock.sendall(wire.encode(name, content))
        header = _read(sock, 4, spec_text)
        (length,) = struct.unpack("!I", header)
        if not 0 < length <= 64 * 1024 * 1024:
            raise CtlError(f"the controller at {spec_text} sent a packet of {length} bytes")
        payload = _read(sock, length, spec_text)
    except socket.timeout:
        raise CtlError(f"no answer from the controller at {spec_text} within {timeout} s") \
            from None
    finally:
        sock.close()
    reply, _, text = payload.partition(b"\0")
    return reply.decode("ascii", "replace"), text.decode("utf-8", "replace")


def _read(sock, size, spec_text):
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise CtlError(f"the controller at {spec_text} closed the connection")
        data += chunk
    return data


# ------------------------------------------------------------ human output

def _duration(seconds):
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    text = f"{hours}h {minutes:02d}m {seconds:02d}s"
    return f"{days}d {text}" if days else text


def _counts(table):
    return ", ".join(f"{key} {value}" for key, value in sorted(table.items())) or "-"


def _table(headers, rows):
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = []
    for row in (headers, *rows):
        lines.append("  ".join(str(cell).ljust(width) for cell, width in
                               zip(row, widths)).rstrip())
    return "\n".join(lines)


def _ms(latency, key):
    value = latency.get(key)
    return "-" if value is None else f"{value:g}"


def _state(child):
    if child["state"] == "down":
        # With manager.n_workers: down in some of the workers (down_in of them).
        where = f" in {child['down_in']} workers" if child.get("down_in") else ""
        return f"down since {child['since']}{where}"
    return child["state"]


def _worker_state(worker):
    if worker["state"] == "unreachable":
        return f"unreachable: {worker.get('reason') or 'no answer'}"
    return worker["state"]


def _workers(workers):
    """The table of a supervisor's workers (manager.n_workers), from get-status's workers."""
    rows = [(worker["number"], worker["pid"] or "-", _worker_state(worker),
             worker.get("sessions", {}).get("started", "-"),
             worker.get("sessions", {}).get("in_flight", "-"), worker.get("messages", "-"),
             worker["restarts"]) for worker in workers]
    return _table(("WORKER", "PID", "STATE", "SESSIONS", "IN FLIGHT", "MESSAGES", "RESTARTS"),
                  rows)


def format_status(data):
    configuration = data["configuration"]
    sessions, messages = data["sessions"], data["messages"]
    lines = [
        f"milter-manager pid {data['pid']}, up {_duration(data['uptime'])} "
        f"(since {data['started']})",
        f"configuration: generation {configuration['generation']}, loaded "
        f"{configuration['loaded']}, files: {', '.join(configuration['files']) or 'built-in'}",
        f"sessions: {sessions['started']} started, {sessions['finished']} finished, "
        f"{sessions['in_flight']} in flight",
        f"messages: {messages['total']} ({_counts(messages['verdicts'])})",
        f"trace: the last {data['trace_sessions']} sessions" if data["trace_sessions"]
        else "trace: off",
        "",
    ]
    rows = [(child["name"], _state(child), child["failures_in_row"], child["messages"],
             _ms(child["latency_ms"], "p50"), _ms(child["latency_ms"], "p90"),
             _ms(child["latency_ms"], "p99"), _counts(child["fallbacks"]),
             _counts(child["stops"])) for child in data["children"]]
    lines.append(_table(("CHILD", "STATE", "FAILS", "MESSAGES", "P50ms", "P90ms", "P99ms",
                         "FALLBACKS", "STOPPED"), rows) if rows else "no child milter")
    if data.get("workers"):
        lines += ["", _workers(data["workers"])]
    return "\n".join(lines)


def format_children(data):
    blocks = []
    for child in data["children"]:
        latency = child["latency_ms"]
        lines = [f"{child['name']} ({child['connection_spec'] or 'not configured now'}): "
                 f"{_state(child)}, {child['failures_in_row']} failures in a row",
                 f"  messages: {child['messages']}",
                 f"  latency: p50 {_ms(latency, 'p50')} ms, p90 {_ms(latency, 'p90')} ms, "
                 f"p99 {_ms(latency, 'p99')} ms, max {_ms(latency, 'max')} ms "
                 f"(last {child['latency_samples']} replies)"]
        if child["replies"]:
            rows = [(stage, _counts(statuses)) for stage, statuses in child["replies"].items()]
            lines.append("  " + _table(("STAGE", "REPLIES"), rows).replace("\n", "\n  "))
        lines.append(f"  stopped by: {_counts(child['stops'])}")
        lines.append(f"  fallbacks: {_counts(child['fallbacks'])}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) or "no child milter"


def _decision(entry):
    kind = entry["decision"]
    if kind == "replied":
        text = f"replied {entry['status']}"
        if entry["verdict"] != entry["status"]:
            text += f" (said {entry['verdict']}: evaluation mode)"
        if entry["reply"]:
            text += f' "{entry["reply"]}"'
        return text + f", {entry['elapsed_ms']:g} ms"
    if kind == "stopped":
        return (f"stopped by condition {entry['condition']} (stopper {entry['stopper']} "
                f"at {entry['origin']})")
    return f"fell back to {entry['status']}: {entry['cause']} ({entry['reason']})"


def _decisions(entries):
    rows = [(f"    {entry['stage']}", entry["child"], _decision(entry)) for entry in entries]
    return _table(("    STAGE", "CHILD", "DECISION"), rows) if rows else "    (none)"


def format_trace(data):
    elapsed = "in flight" if not data["ended"] else f"{data['elapsed']:g} s"
    lines = [f"session {data['session']}, started {data['started']} ({elapsed}); "
             f"children: {', '.join(data['children']) or 'none'}",
             "  connection:", _decisions(data["connection"])]
    for message in data["messages"]:
        decided = f" by {message['decided_by']}" if message["decided_by"] else ""
        lines.append(f"  message {message['queue_id'] or '(no queue id)'}: "
                     f"{message['verdict']}{decided} at {message['stage']} "
                     f"({message['elapsed']:g} s)")
        lines.append(_decisions(message["decisions"]))
    if data.get("in_progress"):
        lines += ["  message in progress:", _decisions(data["in_progress"])]
    if data["dropped"]:
        lines.append(f"  ({data['dropped']} later decisions not kept)")
    return "\n".join(lines)


# ------------------------------------------------------------ passwd

def password_file_of(options):
    """The web password file for options: --password-file, else the configuration's."""
    if options.password_file:
        return options.password_file
    path = options.config or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)
    if path is None:
        raise CtlError(f"no configuration file ({DEFAULT_CONFIG} does not exist) to find "
                       "web.password_file in; give --password-file or -c", 1)
    from miltermanager import config

    try:
        configuration = config.load(path, load_paths=config.load_paths())
    except (config.ConfigurationError, OSError) as error:
        raise CtlError(f"cannot read {path} for web.password_file: {error}; give "
                       "--password-file", 1) from None
    if configuration.web.password_file is None:
        raise CtlError(f"{path} sets no web.password_file; set it, or give --password-file", 1)
    return configuration.web.password_file


def read_password(stdin):
    """The new password: stdin's first line when it is not a terminal, else asked twice."""
    if not stdin.isatty():
        line = stdin.readline()
        return line.rstrip("\r\n")
    import getpass

    first = getpass.getpass("New password: ")
    if first and getpass.getpass("Again: ") != first:
        raise CtlError("the two passwords differ; nothing changed", 1)
    return first


def passwd(options, stdin, stdout):
    from miltermanager.web import auth

    name = options.query
    if not name:
        raise CtlError("passwd needs a user name", 1)
    try:
        auth.check_name(name)
    except ValueError as error:
        raise CtlError(str(error), 1) from None
    if options.role is not None and options.role not in auth.ROLES:
        raise CtlError(f"the role is {' or '.join(auth.ROLES)}, not {options.role!r}", 1)
    path = password_file_of(options)
    try:
        role = options.role
        if role is None:
            users = auth.read_users(path) if os.path.exists(path) else {}
            role = users.get(name, ("admin",))[0]
        if options.delete:
            try:
                auth.delete_user(path, name)
            except KeyError:
                raise CtlError(f"{path} has no user {name}; nothing changed", 1) from None
            stdout.write(f"removed {name} from {path}\n")
            return 0
        password = read_password(stdin)
        if not password:
            raise CtlError("the password is empty; nothing changed", 1)
        auth.add_user(path, name, password, role)
    except auth.PasswordFileError as error:
        raise CtlError(f"{error}; nothing changed", 1) from None
    except OSError as error:
        raise CtlError(f"cannot write {path}: {error.strerror or error}", 1) from None
    stdout.write(f"set the password of {name} ({role}) in {path}\n")
    return 0


# ------------------------------------------------------------ main

def run(options, stdout, stdin=None):
    if options.command == "passwd":
        return passwd(options, stdin or sys.stdin, stdout)
    spec = spec_of(options)
    command = options.command
    if command == "trace":
        if not options.query:
            raise CtlError("trace needs a queue id or a session number")
        reply, text = ask(spec, "get-trace", options.query.encode("utf-8"), options.timeout)
    elif command in ("status", "children"):
        reply, text = ask(spec, "get-status", b"", options.timeout)
    elif command == "reload":
        reply, text = ask(spec, "reload", b"", options.timeout)
    else:
        reply, text = ask(spec, "get-configuration", b"", options.timeout)
    if reply in ("error", "failure"):
        if options.json:
            stdout.write(json.dumps({"result": reply, "message": text}) + "\n")
            return 1
        raise CtlError(text, 1)
    if command == "reload":
        stdout.write(json.dumps({"result": "success"}) + "\n" if options.json
                     else "reloaded: new MTA connections use the new configuration\n")
        return 0
    if command == "show-config":
        stdout.write(json.dumps({"configuration": text}) + "\n" if options.json else text)
        return 0
    try:
        data = json.loads(text)
    except ValueError:
        raise CtlError(f"the controller answered {reply} with text that is not JSON: "
                       f"{text[:80]!r}", 1) from None
    if options.json:
        if command == "children":
            data = data["children"]
        stdout.write(json.dumps(data, indent=2) + "\n")
        return 0
    formatter = {"status": format_status, "children": format_children,
                 "trace": format_trace}[command]
    stdout.write(formatter(data) + "\n")
    return 0


def main(argv=None, stdout=None, stderr=None, stdin=None):
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    options = build_parser().parse_args(argv)
    try:
        return run(options, stdout, stdin)
    except CtlError as error:
        stderr.write(f"{PROGRAM_NAME}: {error}\n")
        return error.status


if __name__ == "__main__":
    sys.exit(main())
