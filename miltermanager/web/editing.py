"""Changes to the configuration from the web: milter-manager.custom.conf, its versions, undo."""


class Editor:
    def __init__(self, service, clock):
        self.service = service
        self.clock = clock
