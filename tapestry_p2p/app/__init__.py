"""The terminal: the `tapestry` command line, the demo, the monitor UI and plots. Nothing imports `app`."""
