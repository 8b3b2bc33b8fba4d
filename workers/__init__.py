"""Pipeline stages, one module each. Imports go ``workers → pipeline``, never back."""
