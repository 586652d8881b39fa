"""golfjax.train"""
