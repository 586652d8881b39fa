"""golfjax.export"""
