class SaintError(ValueError):
    """Bad input that the user can fix: the CLI prints it as one line and exits 2."""
