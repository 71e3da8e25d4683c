"""latentdiff.eval"""
