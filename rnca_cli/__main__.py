"""``python -m rnca_cli`` runs the command line."""

from .cli import run

run()
