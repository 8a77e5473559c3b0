"""Built-in condition plugins beyond the class label (sandbox/core/condition.py): captions, condition images."""
