"""The Typer command line: parsing, messages and exit codes only; the work is in the core."""
