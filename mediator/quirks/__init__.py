"""Quirk tables: the policy, as data.

``schema`` says what a table may contain, ``table`` loads, checks and merges
tables (built-ins in ``builtin/``, then the operator's) and picks the quirks
that match a function. Carrying them out is ``mediator.virt``'s job.
"""
