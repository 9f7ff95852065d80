"""kombinat_api."""
