"""The run configuration: the dataclass schema and its loading (`schema`), typed key checks and `--help` (`keys`)."""
