"""The configuration schema, for method files: ``lungjax.config_schema`` declares every
field lungjax reads, with its default (method files start from its ``get_config()``)."""

from lungjax.config_schema import OPTIONAL, REQUIRED, get_config, parse_variant  # noqa: F401
