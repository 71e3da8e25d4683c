"""latentdiff.data"""
