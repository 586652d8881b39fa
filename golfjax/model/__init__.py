"""golfjax.model"""
