"""`detect_milters()` in a configuration file: define a child for each milter found.

Each found milter is defined as `define_milter(name)` would (a milter the
file defined already is updated and moves to the end), with its socket,
enabled, description and default conditions, each value's origin being
"detected from FILE" so that --show-config says where it came from. A
skipped candidate, a condition that is not defined and a detection that
fails are each one warning: detection never makes a configuration fail.
"""

from miltermanager.config.model import ConfigurationError, MilterConfig, set_value


def detect_milters(loader, platform=None, options=None):
    """Detect the installed milters (package.platform, package.options) and define them.

    Returns the detect.Report, or None when detection failed.
    """
    from miltermanager import detect

    configuration = loader.configuration
    location = loader.location()
    where = f"{location}: " if location else ""
    platform = platform or configuration.package.platform
    if options is None:
        options = configuration.package.parsed_options
    elif isinstance(options, str):  # written as package.options is: "prefix=/usr/pkg,..."
        options = dict(option.strip().partition("=")[::2] for option in options.split(","))
    try:
        report = detect.detect(platform, loader.detect_root, options, postconf=False)
    except Exception as error:  # anything: a failed detection only costs its children
        configuration.warnings.append(
            f"{where}detect_milters: milter detection failed, no milter detected: "
            f"{type(error).__name__}: {error}")
        return None
    for skipped in report.skipped:
        configuration.warnings.append(
            f"{where}detect_milters: {skipped.name} skipped: {skipped.path}: {skipped.reason}")
    missing = {}
    for found in report.found:
        _define(configuration, found, missing)
    if missing:
        configuration.warnings.append(
            f"{where}detect_milters: conditions not defined, left out: " + "; ".join(
                f"{name!r} (for {', '.join(milters)})" for name, milters in missing.items())
            + ' (load("applicable-conditions/*.conf") before load_default())')
    return report


def _define(configuration, found, missing):
    origin = f"detected from {found.source}"
    milter = configuration.milter(found.name)
    if milter is None:
        milter = MilterConfig(found.name)
        milter.origins["name"] = origin
    else:
        configuration.milters.remove(milter)
    configuration.milters.append(milter)
    conditions = []
    for name in found.applicable_conditions:
        if name in configuration.conditions:
            conditions.append(name)
        else:
            missing.setdefault(name, []).append(found.name)
    values = {"connection_spec": found.connection_spec, "enabled": found.enabled,
              "applicable_conditions": conditions}
    if found.description:
        values["description"] = found.description
    if found.tarpit:
        # As upstream: a tarpitting milter-greylist answers that much later.
        values["writing_timeout"] = milter.writing_timeout + found.tarpit
        values["reading_timeout"] = milter.reading_timeout + found.tarpit
    for name, value in values.items():
        try:
            set_value(milter, name, value, origin)
        except ConfigurationError as error:
            configuration.warnings.append(f"{origin}: {error}")
