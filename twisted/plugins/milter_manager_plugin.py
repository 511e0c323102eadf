"""The `twistd milter-manager` plugin; everything lives in miltermanager.tap."""

from twisted.application.service import ServiceMaker

milter_manager = ServiceMaker(
    "milter-manager",
    "miltermanager.tap",
    "A milter that runs other milters and merges their answers",
    "milter-manager",
)
