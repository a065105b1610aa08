"""Grader review: a local web page to accept, reject and add HRFs, and the uses of those verdicts.

Verdicts are stored beside the model's results, never over them, so every figure can say what a grader checked.
"""
