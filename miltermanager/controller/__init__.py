"""The controller socket: upstream's control protocol, a real status, the trace of recent sessions."""
