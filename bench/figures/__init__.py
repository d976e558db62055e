"""The figures of ``python -m bench``, one module per figure group, and what they share."""
