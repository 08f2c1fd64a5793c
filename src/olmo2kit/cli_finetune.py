"""CLI: fine-tuning commands: prepare-data, finetune.

Registered on `olmo2kit.cli.app` when cli.py imports this module. Heavy imports stay inside
the command functions so `olmo2kit --help` stays fast.
"""
