"""golfjax.data"""
