"""Stress: whether this milter-manager serves as many SMTP connections as the MTA allows.

"Stressed" means threshold <= the number of MTA connections being served;
a threshold of 0 means never. Left unset, the threshold is found from
Postfix's configuration (`detect_threshold`): three quarters of the smtpd
processes master.cf allows.
"""

import os
import re
import subprocess
from dataclasses import dataclass

POSTFIX_DEFAULT_PROCESS_LIMIT = 100
RATIO = 0.75


def _postconf(name, postconf, run):
    """`postconf -h name`, or None when postconf is missing or fails."""
    try:
        result = run([postconf, "-h", name], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def smtp_maxproc(master_cf):
    """The maxproc column of the `smtp inet` service of a master.cf text.

    None when the service is missing; "-" when it takes the default.
    Continuation lines (starting with white space) and comments are skipped.
    """
    for line in master_cf.splitlines():
        if not line.strip() or line[0] in " \t#":
            continue
        fields = line.split()
        if len(fields) >= 7 and fields[0] == "smtp" and fields[1] == "inet":
            return fields[6]
    return None


def detect_threshold(master_cf=None, postconf="postconf", run=subprocess.run,
                     config_directory="/etc/postfix"):
    """The threshold for Postfix: 0.75 × the smtp service's maxproc, or 0 without Postfix.

    master_cf is the master.cf to read; by default the one in postconf's
    config_directory (else config_directory). A maxproc of "-" (or 0,
    unlimited) takes postconf's default_process_limit (else Postfix's 100).
    Without a readable master.cf or without an smtp service: 0 (never
    stressed). run is subprocess.run, replaceable in tests.
    """
    if master_cf is None:
        directory = _postconf("config_directory", postconf, run) or config_directory
        master_cf = os.path.join(directory, "master.cf")
    try:
        with open(master_cf, encoding="utf-8", errors="replace") as file:
            text = file.read()
    except OSError:
        return 0
    maxproc = smtp_maxproc(text)
    if maxproc is None:
        return 0
    if not re.fullmatch(r"[1-9][0-9]*", maxproc):
        limit = _postconf("default_process_limit", postconf, run)
        maxproc = limit if limit and limit.isdigit() else POSTFIX_DEFAULT_PROCESS_LIMIT
    return int(int(maxproc) * RATIO)


@dataclass
class Stress:
    """The threshold and the decision of the `Stress Notify` and `No Stress` conditions.

    threshold_n_connections None: detected once, on first use, with detect.
    """

    threshold_n_connections: int | None = None

    def threshold(self, detect=detect_threshold):
        """The threshold in force, detecting it the first time if unset."""
        if self.threshold_n_connections is None:
            self.threshold_n_connections = detect()
        return self.threshold_n_connections

    def stressed(self, n_processing_sessions, detect=detect_threshold):
        threshold = self.threshold(detect)
        return threshold > 0 and threshold <= n_processing_sessions
