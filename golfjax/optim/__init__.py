"""golfjax.optim"""
