"""Configuration: recipe files (files: bases and plugin files on a command line), their typed schema (schema),
parsing and checking (recipe), building an experiment (build), plugin discovery (registry), and editing a
value in a recipe file in place (edit)."""
