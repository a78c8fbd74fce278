"""ml_collections configs: `get_config()` in each module; `base` holds every field and its default."""
