"""latentdiff.nn"""
