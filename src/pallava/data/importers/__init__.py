"""Importers: one module per public format, each returning records and failing with a clear error."""
