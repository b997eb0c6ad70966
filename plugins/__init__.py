"""Built-in data-source plugins. They use only the public hooks and the public app API."""
