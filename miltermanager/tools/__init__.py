"""Command-line tools: milter-test-server, milter-test-client."""
