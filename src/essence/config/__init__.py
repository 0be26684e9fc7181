"""Configuration. In: a YAML experiment file and dotted overrides (`load.load_config`).
Out: a frozen, fully checked `schema.Config` that every later stage reads its settings from."""
