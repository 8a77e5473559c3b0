"""Built-in head plugins."""
