"""golfjax.eval"""
