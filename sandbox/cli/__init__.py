"""The command-line interface (click). Typed errors become exit codes only here."""
