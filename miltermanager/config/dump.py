"""Writing a resolved configuration back in its own language, with where each value was set."""

from miltermanager.merge import Status

from .model import settings_of

_HEADER = "# The resolved configuration; each value ends with where it was set (or \"default\").\n"


def dump(configuration):
    """The configuration as a file `load` reads back, each value with a `# FILE:LINE` comment."""
    lines = [_HEADER]
    for section in (configuration.security, configuration.log, configuration.manager):
        lines.append("\n")
        lines.extend(_settings(section.SECTION, section))
    for milter in configuration.milters:
        where = milter.origins.get("name") or "default"
        lines.append(f"\nwith define_milter({_literal(milter.name)}) as milter:  # {where}\n")
        lines.extend(_settings("    milter", milter))
    return "".join(lines)


def _settings(prefix, section):
    for name, item in settings_of(section).items():
        where = section.origins.get(name, "default")
        value = getattr(section, name)
        if value is None and not _accepts_none(item):
            # A required setting left unset (a disabled milter's connection_spec).
            indent = prefix[:len(prefix) - len(prefix.lstrip())]
            yield f"{indent}# {prefix.lstrip()}.{name} is not set\n"
            continue
        literal = item.metadata["literal"](value) if item.metadata["literal"] else _literal(value)
        yield f"{prefix}.{name} = {literal}  # {where}\n"


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
