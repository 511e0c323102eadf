"""The manager's process: file descriptor limit, privileges, pid file, the cleanup process, the heap."""

import gc
import os
import signal

from .listening import remove_socket_file


class StartError(Exception):
    """The manager cannot start as configured (a user, a limit, a pid file)."""


def set_max_file_descriptors(count):
    """setrlimit(NOFILE) soft and hard to count, as upstream; 0 keeps the system's."""
    if not count:
        return
    import resource

    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))
    except (OSError, ValueError) as error:
        reason = max_file_descriptors_problem(count) or str(error)
        raise StartError(f"manager.max_file_descriptors {count}: {reason}") from None


def max_file_descriptors_problem(count):
    """Why setrlimit(NOFILE) to count would fail here, or None (for --check-config)."""
    if not count:
        return None
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if os.geteuid() != 0:
        if hard != resource.RLIM_INFINITY and count > hard:
            return f"above the hard limit {hard}, and not running as root"
        return None
    try:
        with open("/proc/sys/fs/nr_open") as file:
            most = int(file.read())
    except (OSError, ValueError):
        return None
    if count > most:
        return f"above the system's most open files per process, {most} (fs.nr_open)"
    return None


def resolve_identity(user, group):
    """(uid, gid, user name) to switch to for effective_user/effective_group; None for unset.

    Raises StartError naming an unknown user or group.
    """
    import grp
    import pwd

    uid = gid = name = None
    if user is not None:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise StartError(f"security.effective_user: no such user {user!r}") from None
        uid, gid, name = entry.pw_uid, entry.pw_gid, entry.pw_name
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise StartError(f"security.effective_group: no such group {group!r}") from None
    return uid, gid, name


def drop_privileges(user, group):
    """Switch to security.effective_user/effective_group (setgid, initgroups, setuid).

    Not running as root, see switch_problem.
    """
    uid, gid, name = resolve_identity(user, group)
    if uid is None and gid is None:
        return False
    if os.getuid() != 0:
        problem = switch_problem(user, group)
        if problem is None:
            return False
        raise StartError(problem)
    os.setgid(gid)
    if name is not None:
        os.initgroups(name, gid)
        os.setuid(uid)
    else:
        os.setgroups([])
    return True


def switch_problem(user, group):
    """Why we cannot switch to user/group: a name unknown, or not root; None if we can.

    Not running as root, switching to ourselves is a no-op and anything else
    is an error, rather than a manager that silently keeps other rights.
    """
    try:
        uid, gid, _ = resolve_identity(user, group)
    except StartError as error:
        return str(error)
    if os.getuid() == 0 or ((uid is None or uid == os.getuid())
                            and (gid is None or gid == os.getgid())):
        return None
    setting, name = ("effective_user", user) if user is not None else ("effective_group", group)
    return f"security.{setting} {name!r}: cannot switch to it: not running as root"


def write_pid_file(path):
    """Write our pid to path (mode 0644, as upstream's umask 022)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(descriptor, "w") as file:
        file.write(f"{os.getpid()}\n")


def remove_pid_file(path, pid, log=None):
    """Remove path if it still holds pid."""
    try:
        with open(path) as file:
            if file.read().strip() != str(pid):
                return
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        if log is not None:
            log.warn("[pid-file][remove][error] cannot remove {path}: {error}",
                     path=path, error=error.strerror)


def spawn_cleaner(socket_path=None, pid_file=None):
    """Fork a process that keeps our rights and removes socket_path and pid_file once we exit.

    Called just before dropping privileges: files root made in root's
    directories (/run/milter-manager/...) cannot be removed by the effective
    user, and DESIGN §3 wants the socket gone at stop. The child closes
    every descriptor but the read end of a pipe whose write end only this
    process holds; EOF means this process exited (by SIGTERM, a crash or
    SIGKILL alike). It ignores SIGTERM/SIGINT/SIGHUP, which systemd and
    terminals send to the whole group, so it outlives us. It removes the
    socket only if it is still the same file (device and inode) and the pid
    file only if it still holds our pid, so a newer manager's files stay.
    Returns (the pipe's write end, kept open until exit; the child's pid),
    or None when there is nothing to remove.
    """
    targets = []
    if socket_path is not None:
        try:
            info = os.lstat(socket_path)
            targets.append(("socket", socket_path, (info.st_dev, info.st_ino)))
        except FileNotFoundError:
            pass
    if pid_file is not None:
        targets.append(("pid", pid_file, os.getpid()))
    if not targets:
        return None
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the cleanup process: no Python cleanup, no Twisted, just wait
        try:
            for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
                signal.signal(number, signal.SIG_IGN)
            os.closerange(0, read_end)
            os.closerange(read_end + 1, os.sysconf("SC_OPEN_MAX"))
            while True:
                try:
                    if not os.read(read_end, 64):
                        break
                except InterruptedError:
                    continue
            for kind, path, identity in targets:
                if kind == "socket":
                    remove_socket_file(path, identity)
                else:
                    remove_pid_file(path, identity)
        finally:
            os._exit(0)
    os.close(read_end)
    return write_end, pid


def settle_heap():
    """Keep what lives as long as the process out of the garbage collector's full passes.

    A full collection walks every tracked object: at start some 50,000 of
    code and configuration that never become garbage, a pause of 20 to 40
    ms for every session in flight (when sessions still left cyclic
    garbage, the manager made one every 1,500 messages or so). gc.freeze()
    moves what is alive now out of their way (pauses of 6 to 12 ms after
    it). Called once the reactor runs and after each reload: unfreezing
    and collecting first frees the configuration a reload replaced, so at
    most the one still used by sessions in flight at a reload stays frozen
    until the next.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()
