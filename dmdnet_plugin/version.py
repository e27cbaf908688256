"""The package's version, in reports and run settings (pyproject.toml says the same; a test checks)."""

VERSION = "0.4.0"
