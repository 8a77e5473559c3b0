"""Built-in ordering plugins."""
