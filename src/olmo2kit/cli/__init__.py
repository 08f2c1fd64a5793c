"""The `olmo2kit` command line. `app.py` builds the Typer app and lists every command; each command
module parses options, calls the library and prints; `options.py` and `output.py` hold what they share."""
