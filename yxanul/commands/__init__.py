"""Subcommands: one module each, discovered by yxanul.cli."""
