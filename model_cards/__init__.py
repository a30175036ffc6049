"""Jinja2 model-card templates, shipped inside the wheel as the package `macrl.model_cards`."""
