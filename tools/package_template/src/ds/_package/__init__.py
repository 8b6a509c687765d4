"""{{module}}: {{summary}}."""
