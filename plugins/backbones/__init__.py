"""Built-in backbone plugins besides MAR's own (sandbox/core/transformer.py): one file per backbone."""
