"""Model-card templates (jinja2), installed as the package ``rvhub.templates``."""
