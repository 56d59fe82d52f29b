"""Starts the micro-ovms app; Ctrl-C stops it and returns to the REPL."""
from ovms import app

app.main()
