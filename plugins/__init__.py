"""Built-in plugins: one file per plugin, grouped by kind (tokenizers, orderings, heads, datasets)."""
