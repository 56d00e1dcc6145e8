"""Pure renderers: data in, text out. Nothing here prints or exits."""
