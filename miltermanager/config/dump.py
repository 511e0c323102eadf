"""Writing a resolved configuration back in its own language, with where each value was set.

The result is itself a configuration file that loads to the same thing:
each value ends with `# FILE:LINE` (or `# default`). Registered functions
(stoppers, connection checkers, hooks) are written back from the source
text their file had; one whose source is unknown (a lambda) becomes a
comment. Secret settings are never written: they show as `<hidden>` in a
comment.
"""

import ipaddress
import re
import textwrap

from miltermanager.conditions.dnsbl import DNSBLService
from miltermanager.merge import Status

from .model import settings_of

_HEADER = "# The resolved configuration; each value ends with where it was set (or \"default\").\n"


def dump(configuration):
    """The configuration as a file `load` reads back, each value with a `# FILE:LINE` comment."""
    lines = [_HEADER]
    for section in configuration.sections():
        lines.append("\n")
        if section.SECTION == "manager":
            lines.extend(_manager_hooks(section))
        lines.extend(section_lines(section.SECTION, section))
    for helper in configuration.helpers():
        helper_lines = [*section_lines(helper.SECTION, helper), *_calls(helper),
                        *_effective(helper)]
        if helper_lines:
            lines.append("\n")
            lines.extend(helper_lines)
    for condition in configuration.conditions.values():
        where = condition.origins.get("name") or "default"
        if condition.helper is not None:
            lines.extend(_helper_condition(condition))
            continue
        lines.append(f"\nwith define_applicable_condition({_literal(condition.name)}) "
                     f"as condition:  # {where}\n")
        lines.extend(section_lines("    condition", condition))
        for stopper in condition.stoppers:
            lines.extend(_hook(f"@condition.define_{stopper.kind}_stopper", stopper, "    "))
    for milter in configuration.milters:
        where = milter.origins.get("name") or "default"
        lines.append(f"\nwith define_milter({_literal(milter.name)}) as milter:  # {where}\n")
        lines.extend(section_lines("    milter", milter))
    return "".join(lines)


def section_lines(prefix, section):
    """One `PREFIX.NAME = VALUE  # ORIGIN` line per setting of section."""
    indent = prefix[:len(prefix) - len(prefix.lstrip())]
    for name, item in settings_of(section).items():
        where = section.origins.get(name, "default")
        value = getattr(section, name)
        if item.metadata.get("secret") and value is not None:
            yield f"{indent}# {prefix.lstrip()}.{name} = <hidden>  # {where}\n"
            continue
        if value is None and not _accepts_none(item):
            # A required setting left unset (a disabled milter's connection_spec).
            yield f"{indent}# {prefix.lstrip()}.{name} is not set\n"
            continue
        literal = item.metadata["literal"](value) if item.metadata["literal"] else _literal(value)
        yield f"{prefix}.{name} = {literal}  # {where}\n"


def _manager_hooks(manager):
    # Before the settings: use_netstat_connection_checker(interval) also sets
    # connection_check_interval, which a later line may have changed.
    for checker in manager.connection_checkers.values():
        if checker.builtin == "netstat":
            yield (f"manager.use_netstat_connection_checker({checker.arguments[0]!r})"
                   f"  # {checker.origin or 'default'}\n\n")
        else:
            yield from _hook(
                f"@manager.define_connection_checker({_literal(checker.name)})", checker)
    for hook in manager.maintained_hooks:
        yield from _hook("@manager.maintained", hook)
    for hook in manager.event_loop_created_hooks:
        yield from _hook("@manager.event_loop_created", hook)


def _calls(helper):
    # The verbs a file called on a helper, in order: replayed on its defaults
    # they give the same lists.
    for call in helper.calls:
        where = call.origin or "default"
        if call.arguments is None:
            yield (f"# {helper.SECTION}.{call.verb}(...) ({where}) is not shown: its "
                   f"argument cannot be written back (a lambda?)\n")
            continue
        if call.source is not None:
            yield call.source + "\n"
        yield f"{helper.SECTION}.{call.verb}({call.arguments})  # {where}\n"


def _effective(helper):
    # The lists a helper uses, defaults included, as comments: what will be
    # matched or asked, which the calls replayed above do not show.
    for attribute, defaults, meaning in helper.EFFECTIVE:
        entries = getattr(helper, attribute)
        yield f"# {helper.SECTION}.{attribute} in effect ({meaning}):\n"
        if not entries:
            yield "#     (none)\n"
        for entry in entries:
            where = "default" if entry in defaults else "added above"
            yield f"#     {_entry(entry)}  # {where}\n"


def _entry(entry):
    """A helper list's entry as text: a name, a regular expression, a network, a DNSBL zone."""
    if isinstance(entry, re.Pattern):
        flags = ", re.IGNORECASE" if entry.flags & re.IGNORECASE else ""
        pattern = f"r'{entry.pattern}'" if "'" not in entry.pattern else repr(entry.pattern)
        return f"re.compile({pattern}{flags})"
    if isinstance(entry, DNSBLService):
        answers = ", ".join(str(network) for network in entry.expected or ())
        return f"{entry.domain!r} listed by {answers or 'any 127.0.0.0/8 answer'}"
    if isinstance(entry, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return str(entry)
    return repr(entry)


def _helper_condition(condition):
    # A condition a helper defined: the call again. milters=[]: the milters
    # it was added to list it in their applicable_conditions already.
    call = condition.helper
    where = call.origin or "default"
    if call.verb == "restrict_accounts_generic":
        if call.source is None:
            # Defined without stoppers, as a lambda stopper is left out: the
            # milters naming it still load.
            yield (f"\n# restrict_accounts_generic({call.arguments}) ({where}): its function "
                   f"is not shown: its source is unknown (a lambda?)\n"
                   f"define_applicable_condition({_literal(condition.name)})  # {where}\n")
            return
        yield f"\n@restrict_accounts_generic({call.arguments}, milters=[])  # {where}\n"
        yield call.source
        return
    yield f"\n{call.verb}({call.arguments}, milters=[])  # {where}\n"


def _hook(decorator, hook, indent=""):
    where = hook.origin or "default"
    if hook.source is None:
        yield (f"{indent}# {decorator[1:]}: {hook.name} ({where}) is not shown: "
               f"its source is unknown (a lambda?)\n")
        return
    yield f"{indent}{decorator}  # {where}\n"
    yield textwrap.indent(hook.source, indent) + "\n"


def _accepts_none(item):
    try:
        item.metadata["check"](None)
    except ValueError:
        return False
    return True


def _literal(value):
    if isinstance(value, Status):
        value = value.label
    if isinstance(value, str):
        # Double quotes as upstream's files; repr() where that would need escapes.
        return f'"{value}"' if value.isprintable() and not set(value) & {'"', "\\"} else repr(value)
    if isinstance(value, list):
        return f"[{', '.join(_literal(item) for item in value)}]"
    return repr(value)
