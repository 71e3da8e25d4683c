"""latentdiff.samplers"""
