"""The report on a merged result: its numbers per checkpoint, the checkpoints that stand out and why.

``statistics.py`` measures a result as ``load()`` returns it, in one
streaming pass and one sample.
"""
