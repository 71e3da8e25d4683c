"""latentdiff.train"""
