"""Experiments built on the entry points: they train and sample through ``dfm train`` and the library, then
measure (``dfm study-digits``). Kept apart from the entry points in ``launch/``, which they import."""
