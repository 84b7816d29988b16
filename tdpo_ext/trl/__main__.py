"""python -m tdpo_ext.trl: the tdpo-trl command (cli.py). The trainer is imported once, as
tdpo_ext.trl.trainer, whichever way the command starts."""
from .cli import cli

cli()
