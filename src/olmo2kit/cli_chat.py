"""CLI: chat and batch-job commands (the chat capability).

Registered on `olmo2kit.cli.app` when cli.py imports this module. Heavy imports stay inside
the command functions so `olmo2kit --help` stays fast.
"""
