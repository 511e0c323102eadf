"""Restrict Accounts: children that run only for messages whose every recipient is restricted.

`restrict_accounts_by_list(*accounts)` and `restrict_accounts_generic(function)`
in a configuration file define such a condition. Its RCPT stopper withholds
each recipient that is not restricted from the child and notes it; its DATA
stopper then stops the child for the message, as upstream's.
"""

import re


def address(recipient):
    """An envelope address without its angle brackets and lower-cased ("<A@B>" -> "a@b")."""
    value = recipient.strip()
    if value.startswith("<"):
        value = value[1:].split(">", 1)[0]
    return value.strip().lower()


def check_account(entry):
    """entry if it can name restricted accounts; TypeError otherwise."""
    if isinstance(entry, str) and entry.strip():
        return entry.strip().lower()
    if isinstance(entry, re.Pattern):
        return entry
    raise TypeError("an account is an address (a non-empty string) or a compiled regular "
                    "expression")


def list_matcher(accounts):
    """function(context, recipient) telling whether recipient is one of accounts.

    A string account matches that address exactly (case-insensitively, with
    or without angle brackets); a compiled regular expression is searched
    in the address without its brackets.
    """
    exact = {account for account in accounts if isinstance(account, str)}
    patterns = [account for account in accounts if isinstance(account, re.Pattern)]

    def restricted(context, recipient):
        value = address(recipient)
        return value in exact or any(pattern.search(value) for pattern in patterns)

    return restricted


def stoppers(condition_name, restricted):
    """The (envelope_recipient, data) stoppers of a Restrict Accounts condition.

    restricted(context, recipient) tells whether recipient is restricted.
    The note that a recipient was not lives in the transaction's shelf,
    per condition and child.
    """

    def unrestricted_recipient(context, recipient):
        if restricted(context, recipient):
            return False
        context.mail_transaction_shelf[("restrict-accounts", condition_name, context.name)] = True
        return True

    def unrestricted_message(context):
        return bool(context.mail_transaction_shelf.get(
            ("restrict-accounts", condition_name, context.name)))

    return unrestricted_recipient, unrestricted_message
